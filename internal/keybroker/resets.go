package keybroker

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/seal"
)

// kindReset: name TPM UUID; data: a RollbackReset. A TPM that had state but
// no generation record here, so its rollback protection started over.
const kindReset = "rollback-reset"

// RollbackReset is a TPM whose rollback protection started over on this
// host: it had state but no generation record (deleted, or the TPM came from
// another host), so an older copy of its state could have been taken for the
// current one at that start.
type RollbackReset struct {
	TPM  uuid.UUID `json:"tpm"`
	Dir  string    `json:"dir"`
	Time time.Time `json:"time"`
}

// HasGenerations reports whether TPM id has a generation record here.
func (h *Broker) HasGenerations(id uuid.UUID) (bool, error) { return h.ks.Generations().Has(id) }

// PrepareGenerations makes sure TPM id, whose state is in dir, has a
// generation record, creating one if needed. hadRecord says whether it had
// one before anything of this start wrote to it (opening the key records
// the protector's version there). reset is set when it had none although
// dir holds sealed state: rollback protection starts over for that TPM,
// which is remembered (RollbackResets).
func (h *Broker) PrepareGenerations(id uuid.UUID, dir string, hadRecord bool) (reset bool, err error) {
	gens := h.ks.Generations()
	has, err := gens.Has(id)
	if err != nil {
		return false, err
	}
	if !has {
		p, err := gens.Pin(id) // creates the record
		if err != nil {
			return false, err
		}
		p.Close()
	}
	if hadRecord || !seal.HasBlobs(dir) {
		return false, nil // known, or a new TPM: nothing to protect yet
	}
	abs, _ := filepath.Abs(dir)
	b, _ := json.Marshal(RollbackReset{TPM: id, Dir: abs, Time: time.Now().UTC().Truncate(time.Second)})
	if err := h.ks.Put(kindReset, id.String(), b); err != nil {
		return true, fmt.Errorf("remember the reset of TPM %s's rollback protection: %w", id, err)
	}
	return true, nil
}

// RollbackResets lists the TPMs whose rollback protection started over on
// this host (see PrepareGenerations), for the host's health report.
func (h *Broker) RollbackResets() ([]RollbackReset, error) {
	names, err := h.ks.List(kindReset)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []RollbackReset
	for _, n := range names {
		b, err := h.ks.Get(kindReset, n)
		if err != nil {
			return nil, err
		}
		var r RollbackReset
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("keystore record %s/%s is damaged: %w", kindReset, n, err)
		}
		out = append(out, r)
	}
	return out, nil
}
