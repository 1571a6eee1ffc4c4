package keybroker

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/seal"
)

// MissingStateError refuses a state directory that has lost the TPM's
// identity (vtpm-state.json) while the TPM's key protector or sealed blobs
// are still there: the TPM existed and its state is gone. Making a new
// identity would start a fresh, empty TPM in its place without a word, so
// nothing is written.
type MissingStateError struct {
	Dir string
	// TPM is the UUID the key protector names, uuid.Nil if it has none.
	TPM          uuid.UUID
	HasProtector bool
	HasBlobs     bool // sealed blobs are left (bound to the lost identity)
}

func (e *MissingStateError) Error() string {
	tpm := "a TPM"
	if e.TPM != uuid.Nil {
		tpm = "TPM " + e.TPM.String()
	}
	var left, lost string
	switch {
	case e.HasProtector && e.HasBlobs:
		left, lost = "its "+ProtectorFile+" and sealed blobs are there", "its identity"
	case e.HasProtector:
		left, lost = "its "+ProtectorFile+" is there", "its sealed state"
	default:
		left, lost = "its sealed blobs are there", "its identity"
	}
	return fmt.Sprintf("%s held %s (%s) but %s (%s) is missing; nothing was changed: starting would make a fresh, empty TPM in its place",
		e.Dir, tpm, left, lost, seal.StateFileName)
}

// Unwrap is errdefs.ErrDataLoss.
func (e *MissingStateError) Unwrap() error { return errdefs.ErrDataLoss }

// Remedies: restore the state; a fresh TPM only deliberately.
func (e *MissingStateError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Advise("restore the TPM's state directory %s from a backup (all of it: %s, the sealed blobs and %s)", e.Dir, seal.StateFileName, ProtectorFile),
		errdefs.Advise("to give up the TPM deliberately, move the whole directory away and start on a new, empty one"),
	}
}

// checkMissingState refuses (reading only) a directory whose TPM lost its
// identity; see MissingStateError.
func checkMissingState(dir string) error {
	if seal.Exists(dir) {
		return nil
	}
	// Blobs name the TPM they belong to: seal says which.
	if err := seal.CheckIdentity(dir); err != nil {
		return err
	}
	blobs := seal.HasBlobs(dir)
	p, err := ReadProtector(dir)
	switch {
	case err == nil:
		return &MissingStateError{Dir: dir, TPM: p.TPM(), HasProtector: true, HasBlobs: blobs}
	case errors.Is(err, fs.ErrNotExist):
		if blobs {
			return &MissingStateError{Dir: dir, HasBlobs: true}
		}
		return nil // a new TPM
	}
	// A protector that does not verify still says a TPM was here.
	if _, serr := os.Lstat(filepath.Join(dir, ProtectorFile)); serr == nil {
		return &MissingStateError{Dir: dir, HasProtector: true, HasBlobs: blobs}
	}
	return err
}
