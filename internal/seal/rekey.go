package seal

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/google/uuid"
)

// Rekey re-seals the TPM state in dir, which opts.Key opens, under newKey,
// and calls commit to make newKey the TPM's key (by writing its key
// protector); commit must do so atomically and durably, or not at all.
//
// Rekey takes the directory's lock, so a running TPM is refused with an
// error matching ErrLocked before anything is written. Then, crash-safely:
//
//  1. every blob is loaded under the old key, with rollback detection, and
//     written as its next generation under newKey into the slot that does
//     not hold its newest copy (as Store does), durably: the newest copies
//     under the old key are untouched, so the old key still opens the
//     state, the new copies being ignored as copies that do not verify;
//  2. commit switches the TPM to newKey: from then on newKey opens the new
//     copies, and the old key's copies do not verify;
//  3. the old key's copies are removed, so that whoever knows the old key
//     cannot read the TPM's current state from them.
//
// At every instant the key the directory names opens a complete copy of
// every blob. A failure before commit returns that failure, with the state
// still under the old key. Once commit succeeded Rekey returns nil: a copy
// under the old key it could not remove is logged, and the new generations
// are recorded in opts.Generations.
func Rekey(dir string, opts Options, newKey []byte, commit func() error) error {
	newAEAD, err := newAEAD(newKey)
	if err != nil {
		return fmt.Errorf("re-key the TPM state in %s: %w", dir, err)
	}
	if !Exists(dir) {
		// Open would give the directory a new identity.
		return fmt.Errorf("re-key the TPM state in %s: %w", dir, &fs.PathError{Op: "open", Path: filepath.Join(dir, StateFileName), Err: fs.ErrNotExist})
	}
	s, err := Open(dir, opts)
	if err != nil {
		return err
	}
	defer func() {
		if err := s.Close(); err != nil {
			s.log.Warn("re-keyed TPM state: closing the store", "err", err)
		}
	}()
	plains := map[string][]byte{}
	defer func() {
		for _, p := range plains {
			clear(p)
		}
	}()
	for _, name := range Names {
		b, err := s.Load(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("re-key TPM %s: %w", s.id, err)
		}
		plains[name] = b
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	type written struct {
		name string
		slot int
		gen  uint64
	}
	var done []written
	for _, name := range Names {
		plain, ok := plains[name]
		if !ok {
			continue
		}
		plan, err := s.planWrite(newAEAD, name, plain)
		if err != nil {
			return fmt.Errorf("re-key TPM %s: %w", s.id, err)
		}
		b := s.blob(name)
		for i, st := range plan.steps {
			if err = st.run(); err != nil {
				if i < plan.firstSlotStep {
					b.scanned = false
				}
				break
			}
		}
		if cerr := plan.w.close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("re-key TPM %s: write %s under the new key: %w (the state still opens with the old key)", s.id, name, err)
		}
		b.migrated = true // the slot write ran any migration steps
		done = append(done, written{name, plan.slot, plan.gen})
	}
	if err := commit(); err != nil {
		return fmt.Errorf("re-key TPM %s: %w", s.id, err)
	}

	removed := false
	for _, w := range done {
		keep := slotPath(s.dir, w.name, w.slot)
		for _, p := range append(copyPaths(s.dir, w.name), tempFiles(s.dir, w.name)...) {
			if p == keep {
				continue
			}
			switch err := os.Remove(p); {
			case err == nil:
				removed = true
			case !errors.Is(err, fs.ErrNotExist):
				s.log.Warn("re-keyed TPM state: cannot remove a copy under the old key; remove it, since whoever knows the old key can read it", "file", p, "err", err)
			}
		}
		b := s.blob(w.name)
		b.scanned, b.newest, b.gen = true, w.slot, w.gen
		if s.rec != nil {
			s.rec.add(w.name, w.gen)
		}
	}
	if removed {
		if err := syncDir(s.dir); err != nil {
			s.log.Warn("re-keyed TPM state: fsync of the directory after removing the old copies", "err", err)
		}
	}
	return nil
}

// CheckKey reports whether key opens the TPM state in dir: nil when a copy
// of some blob verifies under it, or when there is no blob yet; otherwise
// an error saying why no copy verifies (matching ErrAuth for a wrong key).
// It reads without the directory's lock and
// changes nothing, so a key from an older key protector (one replaced when
// the TPM was re-keyed) can be told apart before the TPM starts.
func CheckKey(dir string, key []byte) error {
	aead, err := newAEAD(key)
	if err != nil {
		return err
	}
	id, err := readStateFile(dir)
	if err != nil {
		return err
	}
	s := &Store{dir: dir, id: id, aead: aead}
	var errs []error
	for _, name := range Names {
		sc := s.scanCopies(name)
		sc.wipe(nil)
		if sc.best != nil {
			return nil
		}
		if sc.present() {
			errs = append(errs, sc.errs())
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("no copy of the state of TPM %s in %s verifies under this key: %w", id, dir, errors.Join(errs...))
}

// readStateFile returns the UUID in dir's vtpm-state.json, which must exist.
func readStateFile(dir string) (uuid.UUID, error) {
	if !Exists(dir) {
		return uuid.Nil, &fs.PathError{Op: "open", Path: filepath.Join(dir, StateFileName), Err: fs.ErrNotExist}
	}
	return loadOrCreateStateFile(dir, 0o600)
}
