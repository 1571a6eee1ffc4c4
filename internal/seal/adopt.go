package seal

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

// Adopt makes dir the home of TPM id, replacing the identity in
// vtpm-state.json, for a TPM whose state arrives from elsewhere (a live
// migration into a new directory). dir must hold no sealed blob: blobs are
// bound to the identity they were sealed under, and would be orphaned. The
// caller holds no Store open on dir.
func Adopt(dir string, id uuid.UUID, mode os.FileMode) error {
	if HasBlobs(dir) {
		return errdefs.New(errdefs.ErrFailedPrecondition, "%s already holds sealed state: a TPM arriving from elsewhere is adopted only into a directory without any", dir)
	}
	if mode == 0 {
		mode = 0o600
	}
	data, err := json.Marshal(stateFile{Format: stateFmt, UUID: id.String()})
	if err != nil {
		return fmt.Errorf("encode %s: %w", StateFileName, err)
	}
	if err := writeFileAtomic(filepath.Join(dir, StateFileName), append(data, '\n'), mode); err != nil {
		return fmt.Errorf("adopt TPM %s in %s: %w", id, dir, err)
	}
	return nil
}
