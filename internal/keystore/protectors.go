package keystore

import (
	"errors"
	"io/fs"

	"github.com/google/uuid"
)

// protectorEntry is the name under which a TPM's generation record holds
// the highest key protector version seen. No state blob has a slash in its
// name, so it cannot collide with one.
const protectorEntry = "/protector"

// ProtectorVersion returns the highest key protector version recorded for
// TPM id, or 0.
func (g *Generations) ProtectorVersion(id uuid.UUID) (uint64, error) {
	f, err := g.k.openGenFile(id, false)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.f.Close()
	return f.last(protectorEntry)
}

// RecordProtectorVersion notes version as seen for TPM id's key protector,
// beside its state generations: an older protector is then refused like
// older state. The stored value never decreases.
func (g *Generations) RecordProtectorVersion(id uuid.UUID, version uint64) error {
	if version == 0 {
		return nil // the default: nothing to record
	}
	f, err := g.k.openGenFile(id, true)
	if err != nil {
		return err
	}
	defer f.f.Close()
	return f.record(protectorEntry, version)
}
