package keystore

import (
	"github.com/google/uuid"
)

// protectorEntry is the name under which a TPM's generation record holds
// the highest key protector version seen. No state blob has a slash in its
// name, so it cannot collide with one.
const protectorEntry = "/protector"

// ProtectorVersion returns the highest key protector version recorded for
// TPM id, or 0.
func (g *Generations) ProtectorVersion(id uuid.UUID) (uint64, error) {
	return g.Last(id, protectorEntry)
}

// RecordProtectorVersion notes version as seen for TPM id's key protector,
// beside its state generations: an older protector is then refused like
// older state. The stored value never decreases.
func (g *Generations) RecordProtectorVersion(id uuid.UUID, version uint64) error {
	if version == 0 {
		return nil // the default: nothing to record
	}
	return g.Record(id, protectorEntry, version)
}
