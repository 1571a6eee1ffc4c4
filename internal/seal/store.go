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
	"sync"
	"syscall"

	"github.com/google/uuid"
)

// StateFileName holds the TPM's UUID; its presence marks a vtpm state directory.
const StateFileName = "vtpm-state.json"

const (
	sealedExt = ".sealed"
	prevExt   = ".prev"
	tmpExt    = ".tmp"
	stateFmt  = 1
)

// Options configure Open.
type Options struct {
	Key           []byte      // 32-byte DEK
	Generations   Generations // may be nil: no rollback tracking
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
	gens          Generations
	allowRollback bool
	mode          os.FileMode
	log           *slog.Logger

	mu    sync.Mutex
	lock  *dirLock // nil once closed
	known map[string]uint64
	curOK map[string]bool // the current copy is known to verify
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
	aead, err := newAEAD(opts.Key)
	if err != nil {
		return nil, fmt.Errorf("open sealed state in %s: %w", dir, err)
	}
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
	return &Store{
		dir: dir, id: id, aead: aead, gens: opts.Generations,
		allowRollback: opts.AllowRollback, mode: mode, log: log.With("tpm", id.String()),
		lock: lock, known: map[string]uint64{}, curOK: map[string]bool{},
	}, nil
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

// HasBlobs reports whether dir holds any sealed blob (current or previous copy).
func HasBlobs(dir string) bool {
	for _, n := range Names {
		for _, p := range []string{sealedPath(dir, n), sealedPath(dir, n) + prevExt} {
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
			return uuid.Nil, fmt.Errorf("%s is damaged (%v); it names the TPM whose state is in %s, restore it from backup", path, err, dir)
		}
		if sf.Format != stateFmt {
			return uuid.Nil, fmt.Errorf("%s has format %d, this vtpm reads format %d; use a vtpm release that knows it", path, sf.Format, stateFmt)
		}
		id, err := uuid.Parse(sf.UUID)
		if err != nil {
			return uuid.Nil, fmt.Errorf("%s has an invalid uuid %q (%v); restore it from backup", path, sf.UUID, err)
		}
		return id, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return uuid.Nil, fmt.Errorf("read %s: %w", path, err)
	}
	// A fresh UUID would orphan existing blobs, which are bound to the old one.
	for _, n := range Names {
		for _, p := range []string{sealedPath(dir, n), sealedPath(dir, n) + prevExt} {
			if b, err := readHead(p); err == nil {
				hint := ""
				if len(b) >= 36 && string(b[:len(Magic)]) == Magic {
					hint = fmt.Sprintf(" (%s names TPM %s)", filepath.Base(p), uuid.UUID(b[20:36]))
				}
				return uuid.Nil, fmt.Errorf("%s is missing but %s holds sealed state%s; restore %s from backup", path, dir, hint, StateFileName)
			}
		}
	}
	id, err := uuid.NewRandom()
	if err != nil {
		return uuid.Nil, fmt.Errorf("generate TPM uuid: %w", err)
	}
	data, err = json.Marshal(stateFile{Format: stateFmt, UUID: id.String()})
	if err != nil {
		return uuid.Nil, fmt.Errorf("encode %s: %w", path, err)
	}
	if err := writeFileAtomic(path, append(data, '\n'), mode); err != nil {
		return uuid.Nil, fmt.Errorf("create %s: %w", path, err)
	}
	return id, nil
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

func sealedPath(dir, name string) string { return filepath.Join(dir, name+sealedExt) }

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

func (s *Store) last(name string) (uint64, error) {
	if s.gens == nil {
		return 0, nil
	}
	g, err := s.gens.Last(s.id, name)
	if err != nil {
		return 0, fmt.Errorf("look up the last generation of %s: %w", name, err)
	}
	return g, nil
}

func (s *Store) record(name string, gen uint64) error {
	if s.gens == nil {
		return nil
	}
	return s.gens.Record(s.id, name, gen)
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
	return errf(ErrRollback, "%s is generation %d, but generation %d of TPM %s was seen last: it is an older copy (rollback); pass --allow-rollback to restore an older copy deliberately",
		file, gen, last, s.id)
}

// Load returns the newest copy of blob name that verifies. It never deletes
// or rewrites anything.
func (s *Store) Load(name string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkOpen(); err != nil {
		return nil, err
	}
	if _, err := typeOf(name); err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	last, err := s.last(name)
	if err != nil {
		return nil, err
	}
	cur := sealedPath(s.dir, name)
	prev := cur + prevExt

	plain, gen, curErr := s.readSealed(cur, name)
	if curErr == nil {
		if gen < last {
			if !s.allowRollback {
				clear(plain)
				return nil, s.rollbackErr(filepath.Base(cur), gen, last)
			}
			s.log.Warn("loading an older generation of TPM state (--allow-rollback)", "file", cur, "generation", gen, "last_seen", last)
		}
		return s.loaded(name, plain, gen, last, true)
	}

	plain, gen, prevErr := s.readSealed(prev, name)
	if errors.Is(curErr, fs.ErrNotExist) && errors.Is(prevErr, fs.ErrNotExist) {
		if name == "permall" && last > 0 && !s.allowRollback {
			return nil, errf(ErrRollback, "%s and %s are missing, but generation %d of TPM %s was seen: the TPM state was deleted or an older copy of %s was put back; pass --allow-rollback to start without it deliberately",
				filepath.Base(cur), filepath.Base(prev), last, s.id, s.dir)
		}
		return nil, fmt.Errorf("load %s from %s: %w", name, s.dir, fs.ErrNotExist)
	}
	if prevErr != nil {
		if errors.Is(prevErr, fs.ErrNotExist) {
			return nil, fmt.Errorf("load %s of TPM %s: %w (no previous copy to fall back to)", name, s.id, curErr)
		}
		return nil, fmt.Errorf("load %s of TPM %s: no copy verifies: %w; %w", name, s.id, curErr, prevErr)
	}
	// One generation back is the price of surviving a damaged newest copy.
	if gen+1 < last {
		if !s.allowRollback {
			clear(plain)
			return nil, fmt.Errorf("%w (and %w)", s.rollbackErr(filepath.Base(prev), gen, last), curErr)
		}
		s.log.Warn("loading an older generation of TPM state (--allow-rollback)", "file", prev, "generation", gen, "last_seen", last)
	}
	s.log.Warn("newest TPM state copy does not verify; using the previous copy", "file", cur, "reason", curErr.Error(), "previous", prev, "generation", gen)
	return s.loaded(name, plain, gen, last, false)
}

func (s *Store) loaded(name string, plain []byte, gen, last uint64, curOK bool) ([]byte, error) {
	s.known[name] = max(gen, last, s.known[name])
	s.curOK[name] = curOK
	if gen > last {
		// A crash between writing a blob and recording it leaves last behind.
		if err := s.record(name, gen); err != nil {
			clear(plain)
			return nil, err
		}
	}
	return plain, nil
}

// Store seals data as the next generation of blob name and writes it
// crash-safely (see the package documentation), then records the generation.
func (s *Store) Store(name string, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.checkOpen(); err != nil {
		return err
	}
	if _, err := typeOf(name); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	steps, gen, err := s.prepareWrite(name, data)
	if err != nil {
		return err
	}
	for _, st := range steps {
		if err := st.run(); err != nil {
			s.cleanupTemps(name)
			return fmt.Errorf("store %s of TPM %s: %s: %w", name, s.id, st.what, err)
		}
	}
	s.known[name] = gen
	s.curOK[name] = true
	if err := s.record(name, gen); err != nil {
		return fmt.Errorf("store %s of TPM %s: written, but %w", name, s.id, err)
	}
	return nil
}

type writeStep struct {
	what string
	run  func() error
}

// prepareWrite seals data and returns the write steps, split out so tests
// can stop after each one as a crash would.
func (s *Store) prepareWrite(name string, data []byte) ([]writeStep, uint64, error) {
	last, err := s.last(name)
	if err != nil {
		return nil, 0, err
	}
	cur := sealedPath(s.dir, name)
	prev := cur + prevExt
	base, ok := s.known[name]
	rotate := s.curOK[name]
	if !ok {
		// First write in this session: find the newest verifiable copy.
		if p, g, err := s.readSealed(cur, name); err == nil {
			clear(p)
			base, rotate = g, true
		} else if p, g, err := s.readSealed(prev, name); err == nil {
			clear(p)
			base = g
		}
	}
	gen := max(base, last) + 1
	sealed, err := sealWith(s.aead, s.id, name, gen, data)
	if err != nil {
		return nil, 0, fmt.Errorf("store %s: %w", name, err)
	}
	tmp, prevTmp := cur+tmpExt, prev+tmpExt
	steps := []writeStep{{"write temporary file", func() error { return writeSynced(tmp, sealed, s.mode) }}}
	if rotate {
		linked := false
		steps = append(steps,
			writeStep{"link current copy as previous", func() error {
				if err := os.Remove(prevTmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
					return err
				}
				if _, err := os.Lstat(cur); errors.Is(err, fs.ErrNotExist) {
					return nil // removed behind our back: nothing to keep
				}
				linked = true
				return linkOrCopy(cur, prevTmp, s.mode)
			}},
			writeStep{"replace previous copy", func() error {
				if !linked {
					return nil
				}
				return os.Rename(prevTmp, prev)
			}},
		)
	}
	steps = append(steps,
		writeStep{"replace current copy", func() error { return os.Rename(tmp, cur) }},
		writeStep{"fsync directory", func() error { return syncDir(s.dir) }},
	)
	return steps, gen, nil
}

func (s *Store) cleanupTemps(name string) {
	cur := sealedPath(s.dir, name)
	for _, p := range []string{cur + tmpExt, cur + prevExt + tmpExt} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("cannot remove temporary file", "file", p, "err", err)
		}
	}
}

// Delete removes blob name, both its current and previous copy. A missing
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
	cur := sealedPath(s.dir, name)
	removed := false
	for _, p := range []string{cur, cur + prevExt, cur + tmpExt, cur + prevExt + tmpExt} {
		err := os.Remove(p)
		switch {
		case err == nil:
			removed = removed || p == cur || p == cur+prevExt
		case !errors.Is(err, fs.ErrNotExist):
			return fmt.Errorf("delete %s: %w", p, err)
		}
	}
	s.curOK[name] = false
	if !removed && mustExist {
		return fmt.Errorf("delete %s from %s: %w", name, s.dir, fs.ErrNotExist)
	}
	return syncDir(s.dir)
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
// needed): what swtpm's --print-states reports.
func ListStates(dir string) ([]StateInfo, error) {
	var out []StateInfo
	for _, n := range Names {
		cur := sealedPath(dir, n)
		st, err := os.Stat(cur)
		if errors.Is(err, fs.ErrNotExist) {
			st, err = os.Stat(cur + prevExt)
		}
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list states in %s: %w", dir, err)
		}
		out = append(out, StateInfo{Name: n, Size: max(st.Size()-Overhead, 0)})
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
	cur := sealedPath(s.dir, name)
	p, g, curErr := s.readSealed(cur, name)
	if curErr == nil {
		clear(p)
		return g, nil
	}
	p, g, prevErr := s.readSealed(cur+prevExt, name)
	if prevErr == nil {
		clear(p)
		return g, nil
	}
	if errors.Is(curErr, fs.ErrNotExist) && errors.Is(prevErr, fs.ErrNotExist) {
		return 0, fmt.Errorf("generation of %s in %s: %w", name, s.dir, fs.ErrNotExist)
	}
	return 0, fmt.Errorf("generation of %s: no copy verifies: %w; %w", name, curErr, prevErr)
}

// Close releases the directory lock. It is safe to call more than once.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lock == nil {
		return nil
	}
	err := s.lock.unlock()
	s.lock = nil
	if err != nil {
		return fmt.Errorf("release lock on %s: %w", s.dir, err)
	}
	return nil
}
