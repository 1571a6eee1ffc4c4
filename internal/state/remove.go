package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Remove deletes the TPM state in dir, in both formats, with the sealed
// state's identity and key protector, so that the next manufacture makes a
// new TPM (new UUID, new key). The directory and its other files (lock,
// policy, backups) stay; a missing directory holds nothing to remove.
//
// Remove does not take dir's lock: its callers know that no TPM process
// serves dir. [Locked.Remove] removes under the lock.
func Remove(dir string) error { return removeState(dir) }

func removeState(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read state directory: %w", err)
	}
	for _, e := range entries {
		if n := e.Name(); e.Type().IsRegular() && IsStateFile(n) {
			if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("remove old TPM state %s: %w", n, err)
			}
		}
	}
	return nil
}
