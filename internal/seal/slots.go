package seal

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Each blob lives in two slot files, written alternately in place; see the
// package documentation. Slot 0 is <name>.a.sealed, slot 1 <name>.b.sealed.
const (
	sealedExt = ".sealed"
	nSlots    = 2

	// The layout before slots: a newest copy replaced by rename, and the
	// copy it replaced. Still read, and renamed into slots on the first
	// write of a blob.
	legacyPrevExt = ".prev"
	legacyTmpExt  = ".tmp"
)

var slotLetters = [nSlots]string{"a", "b"}

func slotPath(dir, name string, slot int) string {
	return filepath.Join(dir, name+"."+slotLetters[slot]+sealedExt)
}

func legacyPath(dir, name string) string     { return filepath.Join(dir, name+sealedExt) }
func legacyPrevPath(dir, name string) string { return legacyPath(dir, name) + legacyPrevExt }

// copyPaths lists every file that may hold a copy of blob name: the two
// slots, then the legacy newest and previous copies.
func copyPaths(dir, name string) []string {
	return []string{
		slotPath(dir, name, 0), slotPath(dir, name, 1),
		legacyPath(dir, name), legacyPrevPath(dir, name),
	}
}

// legacyTemps are files an interrupted legacy write may have left; they
// were never read and are removed on migration and by Delete.
func legacyTemps(dir, name string) []string {
	cur := legacyPath(dir, name)
	return []string{cur + legacyTmpExt, cur + legacyPrevExt + legacyTmpExt}
}

// tempFiles are the files that hold no copy a read looks at: a slot file
// being created, and legacyTemps.
func tempFiles(dir, name string) []string {
	return append([]string{slotPath(dir, name, 0) + slotTmpExt, slotPath(dir, name, 1) + slotTmpExt}, legacyTemps(dir, name)...)
}

// IsBlobFile reports whether base, a file name in a state directory, is
// one this package keeps a sealed blob (or a copy being created) in, in
// either layout.
func IsBlobFile(base string) bool {
	for _, n := range Names {
		rest, ok := strings.CutPrefix(base, n+".")
		if !ok {
			continue
		}
		for _, l := range slotLetters {
			if rest == l+sealedExt || rest == l+sealedExt+slotTmpExt {
				return true
			}
		}
		if l := strings.TrimPrefix(sealedExt, "."); rest == l || strings.HasPrefix(rest, l+".") {
			return true // legacy layout: .sealed, .sealed.prev and their .tmp files
		}
	}
	return false
}

// sealedCopy is the outcome of reading one copy of a blob.
type sealedCopy struct {
	path  string
	slot  int // 0 or 1; -1 for a legacy file
	plain []byte
	gen   uint64
	err   error // nil: verified
}

func (c *sealedCopy) missing() bool { return errors.Is(c.err, fs.ErrNotExist) }

// scan is every copy of one blob, read and verified.
type scan struct {
	copies []sealedCopy
	best   *sealedCopy // newest verified copy; nil if none verifies
}

// slotNewest returns the slot holding the newest verified copy among the
// slots, or -1.
func (sc *scan) slotNewest() int {
	slot, gen := -1, uint64(0)
	for i := range sc.copies {
		c := &sc.copies[i]
		if c.slot >= 0 && c.err == nil && (slot < 0 || c.gen > gen) {
			slot, gen = c.slot, c.gen
		}
	}
	return slot
}

// present reports whether any copy exists, verified or not.
func (sc *scan) present() bool {
	for i := range sc.copies {
		if !sc.copies[i].missing() {
			return true
		}
	}
	return false
}

// damaged returns the copies that exist but do not verify.
func (sc *scan) damaged() []*sealedCopy {
	var out []*sealedCopy
	for i := range sc.copies {
		if c := &sc.copies[i]; c.err != nil && !c.missing() {
			out = append(out, c)
		}
	}
	return out
}

// errs joins the errors of the copies that exist but do not verify.
func (sc *scan) errs() error {
	var errs []error
	for _, c := range sc.damaged() {
		errs = append(errs, c.err)
	}
	return errors.Join(errs...)
}

// wipe clears every plaintext but the one kept.
func (sc *scan) wipe(keep *sealedCopy) {
	for i := range sc.copies {
		if c := &sc.copies[i]; c != keep {
			clear(c.plain)
		}
	}
}

// scanCopies reads and verifies every copy of blob name. The newest
// verified generation wins; on a tie the earlier path (slot a) does.
func (s *Store) scanCopies(name string) *scan {
	paths := copyPaths(s.dir, name)
	sc := &scan{copies: make([]sealedCopy, len(paths))}
	for i, p := range paths {
		c := &sc.copies[i]
		c.path, c.slot = p, -1
		if i < nSlots {
			c.slot = i
		}
		c.plain, c.gen, c.err = s.readSealed(p, name)
		if c.err == nil && (sc.best == nil || c.gen > sc.best.gen) {
			sc.best = c
		}
	}
	return sc
}

// writeStep is one system call (or a few) of a write; prepareWrite returns
// them separately so tests can stop after each one as a crash would.
type writeStep struct {
	what string
	run  func() error
}

// Names of the steps of a slot write; tests use them to tell where a
// crash can leave a torn slot.
const (
	stepOpen     = "open slot"
	stepWrite    = "write slot in place"
	stepTruncate = "truncate slot"
	stepSync     = "fdatasync slot"
	stepCreate   = "write and fsync new slot file"
	stepRename   = "rename new slot file into place"
	stepSyncDir  = "fsync directory"
)

// slotTmpExt marks a slot file being created; it is never read.
const slotTmpExt = ".tmp"

// slotWrite writes one sealed record into slot file path: in place if the
// slot exists, otherwise as a new file made complete and durable before it
// gets the slot's name, so a slot file is never a partial first copy.
type slotWrite struct {
	path   string
	sealed []byte
	mode   os.FileMode
	create bool
	f      *os.File
}

func newSlotWrite(path string, sealed []byte, mode os.FileMode) *slotWrite {
	_, err := os.Lstat(path)
	return &slotWrite{path: path, sealed: sealed, mode: mode, create: errors.Is(err, fs.ErrNotExist)}
}

func (w *slotWrite) steps() []writeStep {
	if w.create {
		tmp := w.path + slotTmpExt
		return []writeStep{
			{stepCreate, func() error { return writeSynced(tmp, w.sealed, w.mode) }},
			{stepRename, func() error {
				if err := os.Rename(tmp, w.path); err != nil {
					return fmt.Errorf("rename %s to %s: %w", tmp, w.path, err)
				}
				return nil
			}},
			{stepSyncDir, func() error { return syncDir(filepath.Dir(w.path)) }},
		}
	}
	return []writeStep{
		{stepOpen, w.open},
		{stepWrite, w.write},
		{stepTruncate, w.truncate},
		{stepSync, w.sync},
	}
}

func (w *slotWrite) open() error {
	f, err := os.OpenFile(w.path, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", w.path, err)
	}
	w.f = f
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w", w.path, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is a %v, not a regular file; move it away", w.path, st.Mode().Type())
	}
	if st.Mode().Perm() != w.mode { // Options.FileMode changed since it was created
		if err := f.Chmod(w.mode); err != nil {
			return fmt.Errorf("chmod %s: %w", w.path, err)
		}
	}
	return nil
}

func (w *slotWrite) write() error {
	if _, err := w.f.WriteAt(w.sealed, 0); err != nil {
		return fmt.Errorf("write %s: %w (is the disk full?)", w.path, err)
	}
	return nil
}

func (w *slotWrite) truncate() error {
	if err := w.f.Truncate(int64(len(w.sealed))); err != nil {
		return fmt.Errorf("truncate %s: %w", w.path, err)
	}
	return nil
}

// sync makes the slot's data and length durable: the only flush of an
// in-place write. Its directory entry and inode are durable since the slot
// was created.
func (w *slotWrite) sync() error {
	if err := fdatasync(w.f); err != nil {
		return fmt.Errorf("fdatasync %s: %w", w.path, err)
	}
	return nil
}

// close closes the slot (an in-place write's descriptor) and, for a slot
// not created, removes the temporary file left by a failed creation.
func (w *slotWrite) close() error {
	if w.create {
		if err := os.Remove(w.path + slotTmpExt); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", w.path+slotTmpExt, err)
		}
	}
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	if err != nil {
		return fmt.Errorf("close %s: %w", w.path, err)
	}
	return nil
}

// migrateSteps renames a legacy layout's copies into free slots: the
// newest copy into slot a, the previous one into slot b. A rename is
// atomic and reads look at both layouts, so a crash between steps loses
// nothing. A legacy file whose slot is taken stays, and is still read.
func (s *Store) migrateSteps(name string) []writeStep {
	var steps []writeStep
	for slot, old := range []string{legacyPath(s.dir, name), legacyPrevPath(s.dir, name)} {
		to := slotPath(s.dir, name, slot)
		if !exists(old) || exists(to) {
			continue
		}
		steps = append(steps, writeStep{"rename " + filepath.Base(old) + " to " + filepath.Base(to), func() error {
			if err := os.Rename(old, to); err != nil {
				return fmt.Errorf("rename %s to %s: %w", old, to, err)
			}
			return nil
		}})
	}
	for _, tmp := range legacyTemps(s.dir, name) {
		if !exists(tmp) {
			continue
		}
		steps = append(steps, writeStep{"remove " + filepath.Base(tmp), func() error {
			if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("remove %s: %w", tmp, err)
			}
			return nil
		}})
	}
	if len(steps) > 0 {
		steps = append(steps, writeStep{"fsync directory after migration", func() error { return syncDir(s.dir) }})
	}
	return steps
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
