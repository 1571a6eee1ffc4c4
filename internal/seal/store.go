package seal

import (
	"crypto/cipher"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/secret"
)

// StateFileName holds the TPM's UUID; its presence marks a vtpm state directory.
const StateFileName = "vtpm-state.json"

const stateFmt = 1

// Options configure Open.
type Options struct {
	Key []byte // 32-byte DEK
	// Generations may be nil: no rollback tracking. It is called from a
	// background goroutine as well as from the Store's methods, so it must
	// be safe for concurrent use.
	Generations   Generations
	AllowRollback bool        // load copies older than the last generation seen
	FileMode      os.FileMode // of files written; default 0600
	Logger        *slog.Logger
}

// StateInfo describes a stored blob for --print-states.
type StateInfo struct {
	Name string
	Size int64 // plaintext size
}

// Store is one TPM's sealed state directory, locked for exclusive use until
// Close. Its Init, Load, Store and Delete methods match the storage
// callbacks libtpms needs.
type Store struct {
	dir           string
	id            uuid.UUID
	aead          cipher.AEAD
	sealKey       *secret.Bytes // the AES key aead was built from; wiped by Close
	gens          Generations
	allowRollback bool
	mode          os.FileMode
	log           *slog.Logger

	mu    sync.Mutex
	lock  *dirLock  // nil once closed
	rec   *recorder // nil without Generations
	blobs map[string]*blobState
}

// blobState is what a Store knows about one blob's copies on disk.
type blobState struct {
	scanned  bool   // newest is known (read from disk, or written since)
	newest   int    // slot holding the newest verified copy, -1 if none
	gen      uint64 // the highest generation seen: on disk, recorded or written
	migrated bool   // no legacy copy is left to rename into a slot
}

type stateFile struct {
	Format int    `json:"format"`
	UUID   string `json:"uuid"`
}

// Exists reports whether dir holds vtpm sealed state.
func Exists(dir string) bool {
	st, err := os.Stat(filepath.Join(dir, StateFileName))
	return err == nil && st.Mode().IsRegular()
}

// Open locks dir (creating it and its vtpm-state.json if missing) and
// returns a Store for it.
func Open(dir string, opts Options) (*Store, error) {
	aead, sealKey, err := newLockedAEAD(opts.Key)
	if err != nil {
		return nil, fmt.Errorf("open sealed state in %s: %w", dir, err)
	}
	ok := false
	defer func() {
		if !ok {
			sealKey.Close()
		}
	}()
	mode := opts.FileMode
	if mode == 0 {
		mode = 0o600
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	lock, err := lockDir(dir, mode)
	if err != nil {
		return nil, err
	}
	id, err := loadOrCreateStateFile(dir, mode)
	if err != nil {
		lock.unlock()
		return nil, err
	}
	s := &Store{
		dir: dir, id: id, aead: aead, sealKey: sealKey, gens: opts.Generations,
		allowRollback: opts.AllowRollback, mode: mode, log: log.With("tpm", id.String()),
		lock: lock, blobs: map[string]*blobState{},
	}
	if s.gens != nil {
		s.rec = startRecorder(s.gens, id, s.log)
	}
	ok = true
	return s, nil
}

// Identify returns the UUID of the TPM whose state is in dir, giving a new
// directory one (and creating it). Key protectors are bound to this UUID, so
// it is needed before the state can be opened.
func Identify(dir string) (uuid.UUID, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return uuid.Nil, fmt.Errorf("create state directory: %w", err)
	}
	return loadOrCreateStateFile(dir, 0o600)
}

// HasBlobs reports whether dir holds any sealed blob (a copy in either slot,
// or in the legacy layout).
func HasBlobs(dir string) bool {
	for _, n := range Names {
		for _, p := range copyPaths(dir, n) {
			if _, err := os.Lstat(p); err == nil {
				return true
			}
		}
	}
	return false
}

func loadOrCreateStateFile(dir string, mode os.FileMode) (uuid.UUID, error) {
	path := filepath.Join(dir, StateFileName)
	data, err := os.ReadFile(path)
	if err == nil {
		var sf stateFile
		if err := json.Unmarshal(data, &sf); err != nil {
			return uuid.Nil, errdefs.New(errdefs.ErrDataLoss, "%s is damaged (%v); it names the TPM whose state is in %s", path, err, dir).
				With(errdefs.Advise("restore it from backup"))
		}
		if sf.Format != stateFmt {
			return uuid.Nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s has format %d, this vtpm reads format %d", path, sf.Format, stateFmt).
				With(errdefs.Advise("use a vtpm release that knows it"))
		}
		id, err := uuid.Parse(sf.UUID)
		if err != nil {
			return uuid.Nil, errdefs.New(errdefs.ErrDataLoss, "%s has an invalid uuid %q (%v)", path, sf.UUID, err).
				With(errdefs.Advise("restore it from backup"))
		}
		return id, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return uuid.Nil, fmt.Errorf("read %s: %w", path, err)
	}
	// A fresh UUID would orphan existing blobs, which are bound to the old one.
	if err := orphanedBlobs(dir); err != nil {
		return uuid.Nil, err
	}
	id, err := uuid.NewRandom()
	if err != nil {
		return uuid.Nil, fmt.Errorf("generate TPM uuid: %w", err)
	}
	data, err = json.Marshal(stateFile{Format: stateFmt, UUID: id.String()})
	if err != nil {
		return uuid.Nil, fmt.Errorf("encode %s: %w", path, err)
	}
	// Publish with link, which fails if another process created the file
	// first: its UUID then wins, and every process agrees on one identity.
	// The temporary name is this UUID's alone and is linked, not renamed,
	// so the one directory fsync after the link makes the identity durable
	// (a new TPM's start waits on every fsync here).
	tmp := path + ".new-" + id.String()
	if err := writeSynced(tmp, append(data, '\n'), mode); err != nil {
		os.Remove(tmp)
		return uuid.Nil, fmt.Errorf("create %s: %w", path, err)
	}
	err = os.Link(tmp, path)
	os.Remove(tmp)
	if errors.Is(err, fs.ErrExist) {
		return loadOrCreateStateFile(dir, mode)
	}
	if err != nil {
		return uuid.Nil, fmt.Errorf("create %s: %w", path, err)
	}
	if err := syncDir(dir); err != nil {
		return uuid.Nil, fmt.Errorf("create %s: %w", path, err)
	}
	return id, nil
}

// CheckIdentity reports, reading only, whether dir has lost the identity
// its sealed blobs are bound to: vtpm-state.json missing while blobs are
// there. Identify would refuse such a directory too, after creating it.
func CheckIdentity(dir string) error {
	if _, err := os.Lstat(filepath.Join(dir, StateFileName)); !errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return orphanedBlobs(dir)
}

// orphanedBlobs is the error for a directory holding sealed blobs but no
// vtpm-state.json, naming the TPM a blob's header claims.
func orphanedBlobs(dir string) error {
	for _, n := range Names {
		for _, p := range copyPaths(dir, n) {
			if b, err := readHead(p); err == nil {
				hint := ""
				if len(b) >= 36 && string(b[:len(Magic)]) == Magic {
					hint = fmt.Sprintf(" (%s names TPM %s)", filepath.Base(p), uuid.UUID(b[20:36]))
				}
				return errdefs.New(errdefs.ErrDataLoss, "%s is missing but %s holds sealed state%s", filepath.Join(dir, StateFileName), dir, hint).
					With(errdefs.Advise("restore %s from backup", StateFileName))
			}
		}
	}
	return nil
}

func readHead(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, headerLen)
	n, err := io.ReadFull(f, b)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:n], nil
}

// UUID returns the TPM's UUID, which every sealed blob is bound to.
func (s *Store) UUID() uuid.UUID { return s.id }

// Dir returns the state directory.
func (s *Store) Dir() string { return s.dir }

// Init is a no-op: Open already holds the lock.
func (s *Store) Init() error { return nil }

func (s *Store) checkOpen() error {
	if s.lock == nil {
		return fmt.Errorf("sealed state store %s is closed", s.dir)
	}
	return nil
}

// lastSeen returns the last generation of name seen: recorded, or handed
// to the recorder and not yet recorded.
func (s *Store) lastSeen(name string) (uint64, error) {
	if s.gens == nil {
		return 0, nil
	}
	g, err := s.gens.Last(s.id, name)
	if err != nil {
		return 0, fmt.Errorf("look up the last generation of %s: %w", name, err)
	}
	return max(g, s.rec.last(name)), nil
}

func (s *Store) blob(name string) *blobState {
	b, ok := s.blobs[name]
	if !ok {
		b = &blobState{newest: -1}
		s.blobs[name] = b
	}
	return b
}

// readSealed reads and verifies one file; errors start with the file name.
func (s *Store) readSealed(path, name string) ([]byte, uint64, error) {
	base := filepath.Base(path)
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", base, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", base, err)
	}
	if st.Size() > MaxPlaintext+Overhead {
		return nil, 0, fmt.Errorf("%s: %d bytes is larger than any sealed state: %w", base, st.Size(), ErrNotSealed)
	}
	file, err := io.ReadAll(f)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: read: %w", base, err)
	}
	plain, gen, err := unsealWith(s.aead, s.id, name, file)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", base, err)
	}
	return plain, gen, nil
}

func (s *Store) rollbackErr(file string, gen, last uint64) error {
	return errf(ErrRollback, "%s is generation %d, but generation %d of TPM %s was seen last: it is an older copy (rollback)",
		file, gen, last, s.id).with(errdefs.Advise("pass --allow-rollback to restore an older copy deliberately"))
}

// Load returns the newest copy of blob name that verifies, looking at both
// slots (and at a legacy layout not yet migrated). A copy that exists but
// does not verify is logged: after a crash during a write it is the slot
// that was being written, and the other slot holds the previous copy. Load
// never deletes or rewrites anything.
func (s *Store) Load(name string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkOpen(); err != nil {
		return nil, err
	}
	if _, err := typeOf(name); err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	last, err := s.lastSeen(name)
	if err != nil {
		return nil, err
	}
	sc := s.scanCopies(name)
	if c := sc.unusable(); c != nil {
		sc.wipe(nil)
		return nil, errdefs.Wrap(errdefs.ErrPermissionDenied, c.err, "load %s of TPM %s", name, s.id).
			With(errdefs.Do(errdefs.ActionRunAsOwner, "path", c.path))
	}
	best := sc.best
	if best == nil {
		if !sc.present() {
			if name == "permall" && last > 0 && !s.allowRollback {
				return nil, errf(ErrRollback, "%s and %s are missing, but generation %d of TPM %s was seen: the TPM state was deleted or an older copy of %s was put back",
					filepath.Base(slotPath(s.dir, name, 0)), filepath.Base(slotPath(s.dir, name, 1)), last, s.id, s.dir).
					with(errdefs.Advise("pass --allow-rollback to start without it deliberately"))
			}
			if name == "permall" && last > 0 {
				s.log.Warn("the TPM's permanent state is missing although it was seen: starting a FRESH, EMPTY TPM in its place (--allow-rollback)",
					"last_seen", last)
			}
			return nil, fmt.Errorf("load %s from %s: %w", name, s.dir, fs.ErrNotExist)
		}
		return nil, errdefs.Wrap(errdefs.ErrDataLoss, sc.errs(), "load %s of TPM %s: no copy verifies", name, s.id).
			With(errdefs.Advise("check the data key, or restore the state directory from backup"))
	}
	// A damaged copy is a write torn by a crash only when nothing says
	// otherwise; anything else is refused, keeping the file as evidence.
	var torn []*sealedCopy
	for _, c := range sc.damaged() {
		reasons, names := s.damageReasons(c, best, last)
		if len(reasons) == 0 {
			torn = append(torn, c)
			continue
		}
		if !s.allowRollback {
			sc.wipe(nil)
			return nil, &DamageError{TPM: s.id, Blob: name, File: filepath.Base(c.path), Damage: c.err,
				Reasons: reasons, Names: names, Loadable: best.gen, Recorded: last}
		}
		moved, err := s.moveAside(c)
		if err != nil {
			sc.wipe(nil)
			return nil, err
		}
		s.log.Warn("a copy of TPM state is damaged and no crash explains it; it was moved aside (--allow-rollback)",
			"file", c.path, "moved_to", moved, "reason", strings.Join(reasons, "; "), "damage", c.err.Error())
		c.err, c.path = fs.ErrNotExist, moved // gone from its slot
	}
	if best.gen < last {
		if !s.allowRollback {
			sc.wipe(nil)
			return nil, s.rollbackErr(filepath.Base(best.path), best.gen, last)
		}
		s.log.Warn("loading an older generation of TPM state (--allow-rollback)", "file", best.path, "generation", best.gen, "last_seen", last)
	}
	for _, c := range torn {
		s.log.Warn("a copy of TPM state does not verify (normal after a crash during a write); using the newest copy that does",
			"file", c.path, "reason", c.err.Error(), "using", best.path, "generation", best.gen)
	}
	sc.wipe(best)
	b := s.blob(name)
	b.scanned, b.newest = true, sc.slotNewest()
	b.gen = max(b.gen, best.gen, last)
	if best.gen > last && s.rec != nil {
		// Written but not recorded: a crash came between the two. Record
		// it only once it is durable (the write may not have reached its
		// fdatasync), or a power loss could make it look like a rollback.
		if err := syncFile(best.path); err != nil {
			s.log.Warn("cannot make the newest TPM state copy durable; not recording its generation", "file", best.path, "err", err)
		} else {
			s.rec.add(name, best.gen)
		}
	}
	return best.plain, nil
}

// Store seals data as the next generation of blob name and writes it into
// the slot that does not hold the newest verified copy, in place, with one
// fdatasync (see the package documentation). When it returns nil the new
// generation is durable; recording it in Generations happens in the
// background.
func (s *Store) Store(name string, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkOpen(); err != nil {
		return err
	}
	if _, err := typeOf(name); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	plan, err := s.prepareWrite(name, data)
	if err != nil {
		return err
	}
	b := s.blob(name)
	for i, st := range plan.steps {
		if err := st.run(); err != nil {
			if cerr := plan.w.close(); cerr != nil {
				s.log.Warn("cleaning up after a failed write", "err", cerr)
			}
			if i < plan.firstSlotStep {
				b.scanned = false // a migration step failed: look again
			}
			// Otherwise b.newest still names the other slot, which this
			// write never touched: the next write retries the same slot.
			return fmt.Errorf("store %s of TPM %s: %s: %w", name, s.id, st.what, err)
		}
	}
	if err := plan.w.close(); err != nil {
		return fmt.Errorf("store %s of TPM %s: %w", name, s.id, err)
	}
	b.scanned, b.migrated, b.newest, b.gen = true, true, plan.slot, plan.gen
	if s.rec != nil {
		s.rec.add(name, plan.gen)
	}
	return nil
}

// writePlan is one write: migration steps (first write of a legacy blob
// only), then the slot write's steps.
type writePlan struct {
	steps         []writeStep
	firstSlotStep int
	gen           uint64
	slot          int
	w             *slotWrite
}

// prepareWrite seals data and plans its write, split out so tests can stop
// after each step as a crash would.
func (s *Store) prepareWrite(name string, data []byte) (*writePlan, error) {
	return s.planWrite(s.aead, name, data)
}

// planWrite is prepareWrite sealing with aead, which Rekey sets to the new
// key's while the Store still reads with the old one.
func (s *Store) planWrite(aead cipher.AEAD, name string, data []byte) (*writePlan, error) {
	b := s.blob(name)
	var steps []writeStep
	if !b.migrated {
		steps = s.migrateSteps(name)
		b.migrated = len(steps) == 0
	}
	if !b.scanned || len(steps) > 0 {
		last, err := s.lastSeen(name)
		if err != nil {
			return nil, err
		}
		sc := s.scanCopies(name)
		sc.wipe(nil)
		if len(steps) > 0 {
			// Where the copies will be once the migration steps ran.
			for slot := range nSlots {
				if sc.copies[slot].missing() {
					sc.copies[slot], sc.copies[nSlots+slot] = sc.copies[nSlots+slot], sc.copies[slot]
					sc.copies[slot].slot, sc.copies[nSlots+slot].slot = slot, -1
				}
			}
		}
		b.newest = sc.slotNewest()
		b.gen = max(b.gen, last)
		if sc.best != nil {
			b.gen = max(b.gen, sc.best.gen)
		}
		b.scanned = true
	}
	gen := b.gen + 1
	sealed, err := sealWith(aead, s.id, name, gen, data)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", name, err)
	}
	slot := 0
	if b.newest == 0 {
		slot = 1
	}
	w := newSlotWrite(slotPath(s.dir, name, slot), sealed, s.mode)
	return &writePlan{steps: append(steps, w.steps()...), firstSlotStep: len(steps), gen: gen, slot: slot, w: w}, nil
}

// Delete removes blob name: both slots, and any legacy copies. A missing
// blob is an error only if mustExist.
func (s *Store) Delete(name string, mustExist bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkOpen(); err != nil {
		return err
	}
	if _, err := typeOf(name); err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	b := s.blob(name)
	copies := copyPaths(s.dir, name)
	removed, changed := false, false
	for i, p := range append(copies, tempFiles(s.dir, name)...) {
		err := os.Remove(p)
		switch {
		case err == nil:
			changed = true
			removed = removed || i < len(copies)
		case !errors.Is(err, fs.ErrNotExist):
			b.scanned = false
			return fmt.Errorf("delete %s: %w", p, err)
		}
	}
	b.scanned, b.newest, b.migrated = true, -1, true // b.gen stays: the next copy outgrows it
	if changed {
		if err := syncDir(s.dir); err != nil {
			return fmt.Errorf("delete %s: %w", name, err)
		}
	}
	if !removed && mustExist {
		return fmt.Errorf("delete %s from %s: %w", name, s.dir, fs.ErrNotExist)
	}
	return nil
}

// States lists the blobs present, with their plaintext sizes, without
// decrypting them.
func (s *Store) States() ([]StateInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkOpen(); err != nil {
		return nil, err
	}
	return ListStates(s.dir)
}

// ListStates lists the blobs stored in dir without opening them (no key is
// needed): what swtpm's --print-states reports. Of a blob's copies it
// reports the one whose (unauthenticated) header claims the newest
// generation and matches the file's size; failing that, any copy.
func ListStates(dir string) ([]StateInfo, error) {
	var out []StateInfo
	for _, n := range Names {
		var (
			found   bool
			size    int64
			bestGen uint64
		)
		for _, p := range copyPaths(dir, n) {
			st, err := os.Lstat(p)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("list states in %s: %w", dir, err)
			}
			gen := uint64(0)
			if head, err := readHead(p); err == nil {
				if h, err := parseHeader(head); err == nil || errors.Is(err, ErrTruncated) {
					if uint64(st.Size()) == sealedSize(h.length) {
						gen = h.gen
					}
				}
			}
			if !found || gen > bestGen {
				found, size, bestGen = true, st.Size(), gen
			}
		}
		if found {
			out = append(out, StateInfo{Name: n, Size: max(size-Overhead, 0)})
		}
	}
	return out, nil
}

// Generation returns the generation of the newest copy of name that
// verifies, or an error wrapping fs.ErrNotExist if there is none.
func (s *Store) Generation(name string) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkOpen(); err != nil {
		return 0, err
	}
	if _, err := typeOf(name); err != nil {
		return 0, err
	}
	sc := s.scanCopies(name)
	sc.wipe(nil)
	switch {
	case sc.best != nil:
		return sc.best.gen, nil
	case !sc.present():
		return 0, fmt.Errorf("generation of %s in %s: %w", name, s.dir, fs.ErrNotExist)
	}
	return 0, fmt.Errorf("generation of %s: no copy verifies: %w", name, sc.errs())
}

// Close records the generations still pending and releases the directory
// lock. It is safe to call more than once.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lock == nil {
		return nil
	}
	var errs []error
	if s.rec != nil {
		if err := s.rec.close(); err != nil {
			errs = append(errs, fmt.Errorf("close sealed state of TPM %s: the state is written, but recording its generation failed, so a rollback to it would go unnoticed: %w", s.id, err))
		}
	}
	if err := s.lock.unlock(); err != nil {
		errs = append(errs, fmt.Errorf("release lock on %s: %w", s.dir, err))
	}
	s.lock = nil
	s.sealKey.Close()
	return errors.Join(errs...)
}
