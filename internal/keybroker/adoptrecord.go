package keybroker

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/swtpm/statefile"
)

// adoptLabel separates the adoption record's MAC from other uses of the
// migration key.
const adoptLabel = "vtpm adopt record v1"

// AdoptRecord is what a sealed TPM's permanent-state migration blob carries
// for a destination on an empty directory (statefile.TagVTPM, which swtpm
// passes over): the TPM's UUID, its signed protector.json and the
// generations of its blobs, followed by an HMAC-SHA256 under the stream's
// migration key over the record and the rest of the blob. The protector's
// signature says who wrote it; the MAC, which only a holder of the data key
// can make, binds the record to the stream. The data key never travels.
type AdoptRecord struct {
	TPM         uuid.UUID         `json:"tpm"`
	Protector   []byte            `json:"protector"`
	Generations map[string]uint64 `json:"generations,omitempty"`

	body, mac, rest []byte // as received, for Verify
}

func adoptMAC(migKey, body, rest []byte) []byte {
	m := hmac.New(sha256.New, migKey)
	m.Write([]byte(adoptLabel))
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(body)))
	m.Write(n[:])
	m.Write(body)
	m.Write(rest)
	return m.Sum(nil)
}

// AppendAdoptRecord appends rec, MACed under migKey, to blob.
func AppendAdoptRecord(blob []byte, rec *AdoptRecord, migKey []byte) ([]byte, error) {
	body, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	return statefile.AppendRecord(blob, statefile.TagVTPM, append(body, adoptMAC(migKey, body, blob)...))
}

// ParseAdoptRecord splits blob into the blob without the record and the
// record (nil when the blob carries none). The record is not verified yet.
func ParseAdoptRecord(blob []byte) (rest []byte, rec *AdoptRecord, err error) {
	rest, value, ok := statefile.CutRecord(blob, statefile.TagVTPM)
	if !ok {
		return rest, nil, nil
	}
	if len(value) < sha256.Size {
		return nil, nil, errdefs.New(errdefs.ErrInvalidArgument, "the migration stream's vtpm record is %d bytes, too short", len(value))
	}
	rec = &AdoptRecord{body: value[:len(value)-sha256.Size], mac: value[len(value)-sha256.Size:], rest: rest}
	if err := json.Unmarshal(rec.body, rec); err != nil {
		return nil, nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "the migration stream's vtpm record is damaged")
	}
	return rest, rec, nil
}

// Verify reports whether the record's MAC holds under migKey.
func (r *AdoptRecord) Verify(migKey []byte) bool {
	return hmac.Equal(r.mac, adoptMAC(migKey, r.body, r.rest))
}

// ParsedProtector is the record's protector, parsed and checked to belong
// to the record's TPM.
func (r *AdoptRecord) ParsedProtector() (*guardian.Protector, error) {
	p, err := guardian.ParseProtector(r.Protector)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrPermissionDenied, err, "the key protector in the stream is rejected")
	}
	if p.TPM() != r.TPM {
		return nil, errdefs.New(errdefs.ErrPermissionDenied, "the key protector in the stream belongs to TPM %s", p.TPM())
	}
	return p, nil
}

// OpenAdopted opens the key of the TPM that rec carries, for a state
// directory dir about to receive it (OpenProtector's rules), and checks
// that the record verifies under the migration key derived from that key,
// so that the record belongs to the stream. It returns the key and the
// protector to write into dir.
func (h *Broker) OpenAdopted(dir string, rec *AdoptRecord, opts OpenOptions) (*Opened, *guardian.Protector, error) {
	p, err := rec.ParsedProtector()
	if err != nil {
		return nil, nil, err
	}
	o, err := h.OpenProtector(dir, p, opts)
	if err != nil {
		return nil, nil, err
	}
	if err := rec.verifyKey(o.Key); err != nil {
		o.Close()
		return nil, nil, err
	}
	return o, p, nil
}

// verifyKey checks that r verifies under the migration key derived from k,
// so that the record belongs to the stream k's TPM sent.
func (r *AdoptRecord) verifyKey(k *Key) error {
	mig, err := k.MigrationKey()
	if err != nil {
		return fmt.Errorf("derive the migration key of TPM %s: %w", r.TPM, err)
	}
	ok := r.Verify(mig.Bytes())
	mig.Close()
	if !ok {
		return errdefs.New(errdefs.ErrPermissionDenied, "the vtpm record does not verify under the key its protector holds")
	}
	return nil
}
