// Package stateimport converts a swtpm 0.7.1 state directory
// (tpm2-00.permall and, if present, tpm2-00.volatilestate and
// tpm2-00.savestate; plain or encrypted with swtpm's --key) into vtpm
// sealed state.
//
// Nothing is ever overwritten or deleted. The sealed state is built in a
// staging directory inside the destination and moved in with vtpm-state.json
// last, so until the import is complete the destination does not look like
// sealed state. An in-place import then moves the swtpm files into a
// swtpm-backup-<timestamp> subdirectory, where they stay byte for byte. If
// the import is interrupted before that, the directory holds both formats
// and vtpm keeps using the swtpm files until vtpm-state.json is in place.
package stateimport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
	"vtpm/internal/libtpms"
	"vtpm/internal/seal"
	"vtpm/internal/state"
	"vtpm/internal/swtpm/statefile"
)

// Options configure Import.
type Options struct {
	Source  string         // swtpm state directory
	Dest    string         // where the sealed state goes; "" = Source (in place)
	FileKey *statefile.Key // swtpm's --key; nil for plain state
	// DataKey returns the key that seals the new state. It is called with
	// the staging directory, into which it may write files that belong
	// beside the sealed state (the key protector); they are moved in with
	// it. Import closes the key.
	DataKey     func(staging string) (state.SealKey, error)
	Generations seal.Generations // the host's generation records; may be nil
	FileMode    os.FileMode      // of the sealed files; 0 = 0600
	Now         func() time.Time // names the backup; nil = time.Now
	Logger      *slog.Logger
}

// Result reports what Import did.
type Result struct {
	Source string    // the swtpm state directory, as given
	Dest   string    // the sealed state directory
	UUID   uuid.UUID // the new TPM identity the sealed blobs are bound to
	States []string  // blob names imported, e.g. permall, volatilestate
	// Backup is the directory the swtpm files were moved to by an in-place
	// import; empty when the destination was another directory and the
	// source was left untouched.
	Backup string
}

// WriteText writes what r imported and where the swtpm files are kept.
func (r *Result) WriteText(w io.Writer) {
	fmt.Fprintf(w, "Imported %s from %s into vtpm sealed state in %s (TPM %s).\n", strings.Join(r.States, ", "), r.Source, r.Dest, r.UUID)
	if r.Backup != "" {
		fmt.Fprintf(w, "The swtpm files are kept in %s.\n", r.Backup)
	}
}

// BackupPrefix starts the name of the directory an in-place import moves
// the swtpm files into.
const BackupPrefix = "swtpm-backup-"

const stagingPrefix = ".vtpm-import-"

// swtpmNames are the states swtpm keeps, in --print-states order.
var swtpmNames = state.Blobs

func swtpmFile(name string) string { return state.SwtpmFile(name) }

// Import converts the swtpm state in opts.Source into sealed state in
// opts.Dest. It refuses when the source has no TPM 2 state, when the
// destination already holds sealed state, when a state file does not
// decrypt or is not a valid TPM 2 state, and when a TPM process uses either
// directory.
func Import(opts Options) (*Result, error) {
	if opts.Source == "" {
		return nil, errors.New("no swtpm state directory given")
	}
	if opts.DataKey == nil {
		return nil, errors.New("no data key source")
	}
	src, err := filepath.Abs(opts.Source)
	if err != nil {
		return nil, err
	}
	dest := src
	if opts.Dest != "" {
		if dest, err = filepath.Abs(opts.Dest); err != nil {
			return nil, err
		}
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.FileMode == 0 {
		opts.FileMode = 0o600
	}

	fi, err := os.Stat(src)
	if err != nil {
		return nil, fmt.Errorf("swtpm state directory: %w", err)
	}
	if !fi.IsDir() {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "%s is not a directory", src)
	}
	if !state.IsSwtpm(src) {
		if state.IsSealed(src) {
			return nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s already holds vtpm sealed state and no swtpm state (%s): nothing to import", src, swtpmFile("permall"))
		}
		return nil, errdefs.New(errdefs.ErrNotFound, "%s holds no swtpm TPM 2 state (%s is missing): nothing to import", src, swtpmFile("permall"))
	}
	owner := ownerOf(filepath.Join(src, swtpmFile("permall")))

	// Lock the source before reading it, so no swtpm or vtpm changes it
	// meanwhile, and the destination before writing it.
	srcLock, err := lock(src)
	if err != nil {
		return nil, err
	}
	defer srcLock.Unlock()
	inPlace := sameDir(src, dest)
	if !inPlace {
		if err := mkdirOwned(dest, owner); err != nil {
			return nil, err
		}
		destLock, err := lock(dest)
		if err != nil {
			return nil, err
		}
		defer destLock.Unlock()
		owner.chown(filepath.Join(dest, state.LockFile))
	}
	if err := checkNoSealed(dest); err != nil {
		return nil, err
	}
	if !inPlace && state.IsSwtpm(dest) {
		return nil, errdefs.New(errdefs.ErrAlreadyExists, "%s holds swtpm state of its own (%s)", dest, swtpmFile("permall")).
			With(errdefs.Advise("import into an empty directory, or import that one in place"))
	}

	states, err := readStates(src, opts.FileKey)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, b := range states {
			clear(b)
		}
	}()
	if err := validate(states); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "%s does not hold a usable TPM 2 state; nothing was changed", src)
	}

	id, err := stageAndMove(dest, states, opts, owner)
	if err != nil {
		return nil, err
	}
	res := &Result{Source: opts.Source, Dest: dest, UUID: id}
	for _, n := range swtpmNames {
		if _, ok := states[n]; ok {
			res.States = append(res.States, n)
		}
	}
	opts.Logger.Info("imported swtpm state", "source", src, "dest", dest, "tpm", id, "states", res.States)
	if inPlace {
		if res.Backup, err = backup(src, res.States, opts.Now(), owner); err != nil {
			return res, fmt.Errorf("the sealed state in %s is complete and is what vtpm uses now, but moving the swtpm files aside failed: %w", dest, err)
		}
	}
	return res, nil
}

func sameDir(a, b string) bool {
	if a == b {
		return true
	}
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

// lock takes dir's lock, so that no swtpm or vtpm changes it meanwhile.
func lock(dir string) (*state.Locked, error) {
	l, err := state.Lock(dir)
	if errors.Is(err, state.ErrLocked) {
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "another TPM process is using this state directory; nothing was imported").
			With(errdefs.Advise("stop it first"))
	}
	return l, err
}

// checkNoSealed refuses a destination that holds sealed state, complete or
// not: import never overwrites.
func checkNoSealed(dir string) error {
	if state.IsSealed(dir) {
		return errdefs.New(errdefs.ErrAlreadyExists, "%s already holds vtpm sealed state (%s); import never overwrites it", dir, state.IdentityFile).
			With(errdefs.Advise("move it away, or import into another directory with --dest"))
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	for _, e := range entries {
		if state.IsSealedBlob(e.Name()) {
			return errdefs.New(errdefs.ErrAlreadyExists, "%s holds sealed blob %s without %s (an interrupted import or a damaged vtpm state?); import never overwrites it", dir, e.Name(), state.IdentityFile).
				With(errdefs.Advise("move it away first"))
		}
	}
	return nil
}

// readStates reads and decodes every swtpm state file present.
func readStates(dir string, key *statefile.Key) (map[string][]byte, error) {
	states := map[string][]byte{}
	for _, n := range swtpmNames {
		p := filepath.Join(dir, swtpmFile(n))
		raw, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", p, err)
		}
		plain, err := statefile.DecodeFile(raw, key)
		if err != nil {
			return nil, decodeError(p, raw, key, err)
		}
		states[n] = plain
	}
	return states, nil
}

// decodeError explains why a state file did not decode, using its header
// when it has swtpm's version 2 header.
func decodeError(path string, raw []byte, key *statefile.Key, err error) error {
	hasHeader := len(raw) >= 10 && raw[0] == 2 && binary.BigEndian.Uint16(raw[2:]) == 10
	encrypted := hasHeader && binary.BigEndian.Uint16(raw[4:])&statefile.FlagEncrypted != 0
	switch {
	case key == nil && encrypted:
		return errdefs.New(errdefs.ErrInvalidArgument, "%s is encrypted: give the --key that swtpm ran with (%v)", path, err)
	case key != nil && hasHeader && !encrypted:
		return errdefs.New(errdefs.ErrInvalidArgument, "%s is not encrypted, but --key was given: drop --key (%v)", path, err)
	case key != nil:
		return errdefs.New(errdefs.ErrInvalidArgument, "%s: decrypt failed: wrong --key? (%v)", path, err)
	}
	return errdefs.Wrap(errdefs.ErrDataLoss, err, "%s: cannot decode the swtpm state file", path)
}

// libtpms hosts one TPM per process.
var validateMu sync.Mutex

// validate has libtpms unmarshal the decoded states, which catches what an
// unencrypted file cannot: a file that is not a TPM 2 state at all.
func validate(states map[string][]byte) error {
	validateMu.Lock()
	defer validateMu.Unlock()
	tpm, err := libtpms.Open(memStorage(states))
	if err != nil {
		return err
	}
	defer tpm.Close()
	types := libtpms.Permanent
	if _, ok := states["volatilestate"]; ok {
		types |= libtpms.Volatile
	}
	if err := tpm.ValidateState(types); err != nil {
		return fmt.Errorf("libtpms rejects it: %w", err)
	}
	return nil
}

// memStorage serves decoded states to libtpms, read-only.
type memStorage map[string][]byte

func (m memStorage) Init() error { return nil }

func (m memStorage) Load(name string) ([]byte, error) {
	b, ok := m[name]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return slices.Clone(b), nil
}

func (m memStorage) Store(name string, data []byte) error {
	return errors.New("state import: libtpms must not write while validating")
}

func (m memStorage) Delete(name string, mustExist bool) error {
	return errors.New("state import: libtpms must not delete while validating")
}

// stageAndMove seals the states in a staging directory inside dest, checks
// that they read back, and moves them into dest, vtpm-state.json last.
func stageAndMove(dest string, states map[string][]byte, opts Options, owner owner) (uuid.UUID, error) {
	staging, err := os.MkdirTemp(dest, stagingPrefix)
	if err != nil {
		return uuid.Nil, fmt.Errorf("create staging directory in %s: %w", dest, err)
	}
	defer os.RemoveAll(staging)
	key, err := opts.DataKey(staging)
	if err != nil {
		return uuid.Nil, err
	}
	defer key.Close()
	s, err := key.OpenStore(staging, seal.Options{
		Generations: opts.Generations,
		FileMode:    opts.FileMode,
		Logger:      opts.Logger,
	})
	if err != nil {
		return uuid.Nil, err
	}
	defer s.Close()
	for _, n := range swtpmNames {
		plain, ok := states[n]
		if !ok {
			continue
		}
		if err := s.Store(n, plain); err != nil {
			return uuid.Nil, fmt.Errorf("seal %s: %w", n, err)
		}
		back, err := s.Load(n)
		if err != nil {
			return uuid.Nil, fmt.Errorf("read back sealed %s: %w", n, err)
		}
		same := slices.Equal(back, plain)
		clear(back)
		if !same {
			return uuid.Nil, fmt.Errorf("sealed %s reads back different", n)
		}
	}
	id := s.UUID()

	entries, err := os.ReadDir(staging)
	if err != nil {
		return uuid.Nil, err
	}
	var moved []string
	for _, e := range entries {
		if n := e.Name(); n != state.LockFile && n != state.IdentityFile {
			moved = append(moved, n)
		}
	}
	moved = append(moved, state.IdentityFile) // its presence makes dest sealed state
	for _, n := range moved {
		to := filepath.Join(dest, n)
		if _, err := os.Lstat(to); !errors.Is(err, fs.ErrNotExist) {
			return uuid.Nil, errdefs.New(errdefs.ErrConflict, "%s appeared during the import; not overwriting it", to)
		}
		owner.chown(filepath.Join(staging, n))
		if err := os.Rename(filepath.Join(staging, n), to); err != nil {
			return uuid.Nil, fmt.Errorf("move sealed state into %s: %w", dest, err)
		}
	}
	if err := atomicfile.SyncDir(dest); err != nil {
		return uuid.Nil, err
	}
	return id, nil
}

// backup moves the imported swtpm files into a new backup subdirectory.
func backup(dir string, names []string, now time.Time, owner owner) (string, error) {
	files := make([]string, len(names))
	for i, n := range names {
		files[i] = swtpmFile(n)
	}
	b, err := state.MoveAside(dir, BackupPrefix+state.Stamp(now), files)
	if b != "" {
		owner.chown(b)
	}
	return b, err
}

// owner is who owns the swtpm state (libvirt runs swtpm as tss), so that
// the vtpm that replaces it, running as the same user, can use what root
// imported.
type owner struct {
	uid, gid int
	ok       bool
}

func ownerOf(path string) owner {
	fi, err := os.Stat(path)
	if err != nil {
		return owner{}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || os.Geteuid() != 0 {
		return owner{}
	}
	return owner{uid: int(st.Uid), gid: int(st.Gid), ok: true}
}

func (o owner) chown(path string) {
	if o.ok {
		os.Lchown(path, o.uid, o.gid) // best effort: as root it works
	}
}

func mkdirOwned(dir string, o owner) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	o.chown(dir)
	return nil
}
