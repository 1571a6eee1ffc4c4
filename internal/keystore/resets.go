package keystore

import (
	"errors"
	"io/fs"
	"os"

	"github.com/google/uuid"
)

// GenerationsPath is the file of TPM id's generation record. An instance
// confined to writing its own files is allowed to write this one.
func (k *Keystore) GenerationsPath(id uuid.UUID) string { return k.path(genKind, id.String()) }

// Has reports whether TPM id has a generation record.
func (g *Generations) Has(id uuid.UUID) (bool, error) {
	_, err := os.Lstat(g.k.GenerationsPath(id))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}
