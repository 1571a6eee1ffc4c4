package keystore

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"

	"github.com/google/uuid"
)

// Generations remembers, in the keystore, the last generation seen of each
// state blob of each TPM (one record per TPM under kind "generations"). It
// satisfies seal.Generations. Record is monotonic across goroutines and
// processes: it reads, raises and writes the record under the keystore's
// writers' lock.
type Generations struct {
	k *Keystore
}

// Generations returns the keystore's generation records.
func (k *Keystore) Generations() *Generations { return &Generations{k: k} }

func (g *Generations) read(id uuid.UUID) (map[string]uint64, error) {
	data, err := g.k.Get(genKind, id.String())
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]uint64{}, nil
	}
	if err != nil {
		// Never treat a damaged record as empty: that would disable rollback detection.
		return nil, err
	}
	m := map[string]uint64{}
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, errf(ErrCorrupt, err, "generation record %s of TPM %s decrypts but does not parse (%v); restore it from backup, or delete it to accept the TPM's current state as genuine", g.k.path(genKind, id.String()), id, err)
	}
	return m, nil
}

// Last returns the last generation recorded for blob name of TPM id, or 0.
func (g *Generations) Last(id uuid.UUID, name string) (uint64, error) {
	m, err := g.read(id)
	if err != nil {
		return 0, err
	}
	return m[name], nil
}

// Record notes gen as seen for blob name of TPM id. The stored value never
// decreases: recording an older generation is a no-op.
func (g *Generations) Record(id uuid.UUID, name string, gen uint64) error {
	if name == "" {
		return fmt.Errorf("record generation %d for TPM %s: empty blob name", gen, id)
	}
	return g.k.withLock(func() error {
		m, err := g.read(id)
		if err != nil {
			return err
		}
		if gen <= m[name] {
			return nil
		}
		m[name] = gen
		data, err := json.Marshal(m)
		if err != nil {
			return fmt.Errorf("encode generation record of TPM %s: %w", id, err)
		}
		if err := g.k.put(genKind, id.String(), data); err != nil {
			return fmt.Errorf("record generation %d of %s for TPM %s: %w", gen, name, id, err)
		}
		return nil
	})
}
