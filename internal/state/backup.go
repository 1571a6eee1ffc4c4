package state

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"vtpm/internal/atomicfile"
)

// Stamp is the UTC time stamp backups of TPM state are named with, such as
// 20250304T050607Z: it sorts by time and is safe in a file name.
func Stamp(t time.Time) string { return t.UTC().Format("20060102T150405Z") }

// MoveAside moves the named files of dir into a new subdirectory dir/sub
// (mode 0700) and makes the moves durable. Nothing is deleted: when a move
// fails, the files moved so far stay in the backup, whose path is returned
// with the error. A backup that exists already is an error, never reused.
func MoveAside(dir, sub string, names []string) (string, error) {
	b := filepath.Join(dir, sub)
	if err := os.Mkdir(b, 0o700); err != nil {
		return "", fmt.Errorf("create backup directory: %w", err)
	}
	for _, n := range names {
		if err := os.Rename(filepath.Join(dir, n), filepath.Join(b, n)); err != nil {
			return b, fmt.Errorf("move %s into %s: %w (the files before it are moved; nothing was deleted)", n, b, err)
		}
	}
	if err := atomicfile.SyncDir(b); err != nil {
		return b, err
	}
	return b, atomicfile.SyncDir(dir)
}
