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
// Remove takes dir's lock before it removes anything, so the state of a
// TPM that is running is left whole: the error then matches [ErrLocked]
// and nothing was changed. Callers that hold the lock use [Locked.Remove].
func Remove(dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	l, err := Lock(dir)
	if err != nil {
		return fmt.Errorf("remove the TPM state in %s: %w; nothing was changed", dir, err)
	}
	defer l.Unlock()
	return l.Remove()
}

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
