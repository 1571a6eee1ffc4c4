package statefile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"vtpm/internal/atomicfile"
	"vtpm/internal/tpmrc"
)

// DefaultMode is the permission swtpm gives state files without mode=.
const DefaultMode os.FileMode = 0o640

// Blob names in the order swtpm's --print-states lists them.
var blobNames = []string{"permall", "volatilestate", "savestate"}

// StateInfo describes one stored state, as --print-states reports it.
type StateInfo struct {
	Name string
	Size int64
}

// Dir is swtpm's directory backend: one file tpm2-00.<name> per state,
// encoded as DecodeFile/EncodeFile describe, guarded by a POSIX lock on
// D/.lock.
type Dir struct {
	dir  string
	key  *Key
	mode os.FileMode

	mu   sync.Mutex
	lock *os.File // the only fd ever opened on .lock, since closing any fd drops a POSIX lock
}

// OpenDir returns a store on dir. Files are written with mode (0 means
// DefaultMode) and encrypted with key when it is non-nil.
func OpenDir(dir string, key *Key, mode os.FileMode) (*Dir, error) {
	if key != nil {
		if err := key.check(); err != nil {
			return nil, fmt.Errorf("state directory %s: %w", dir, err)
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w; create it or fix --tpmstate dir=", dir, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("state directory %s is not a directory; fix --tpmstate dir=", dir)
	}
	if mode == 0 {
		mode = DefaultMode
	}
	return &Dir{dir: dir, key: key, mode: mode.Perm()}, nil
}

// HasState reports whether dir holds a TPM 2 permanent state.
func HasState(dir string) bool {
	fi, err := os.Stat(filepath.Join(dir, fileName("permall")))
	return err == nil && fi.Mode().IsRegular()
}

func fileName(name string) string { return "tpm2-00." + name }

func (d *Dir) path(name string) (string, error) {
	for _, n := range blobNames {
		if n == name {
			return filepath.Join(d.dir, fileName(name)), nil
		}
	}
	return "", fmt.Errorf("unknown state %q; want permall, volatilestate or savestate: %w", name, tpmrc.TPMBadType)
}

// Init takes the exclusive lock on D/.lock, as swtpm does before first use,
// and keeps it until Close. Calling it again is a no-op.
func (d *Dir) Init() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lock != nil {
		return nil
	}
	p := filepath.Join(d.dir, ".lock")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o660)
	if err != nil {
		return fmt.Errorf("opening lock file %s: %w: %w", p, err, tpmrc.TPMFail)
	}
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	if err := syscall.FcntlFlock(f.Fd(), syscall.F_SETLK, &lk); err != nil {
		f.Close()
		return fmt.Errorf("locking %s: %w; another TPM process is using this state directory, stop it first: %w", p, err, tpmrc.TPMFail)
	}
	d.lock = f
	return nil
}

// Close releases the lock.
func (d *Dir) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lock == nil {
		return nil
	}
	err := d.lock.Close()
	d.lock = nil
	if err != nil {
		return fmt.Errorf("closing lock file in %s: %w", d.dir, err)
	}
	return nil
}

// Load returns the plain state stored under name. A missing file gives an
// error wrapping both fs.ErrNotExist and tpmrc.TPMRetry. Like swtpm, it
// changes an existing file's permissions to the configured mode.
func (d *Dir) Load(name string) ([]byte, error) {
	p, err := d.path(name)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("loading %s: %w: %w", name, err, tpmrc.TPMRetry)
		}
		return nil, fmt.Errorf("loading %s: %w: %w", name, err, tpmrc.TPMFail)
	}
	defer f.Close()
	if err := f.Chmod(d.mode); err != nil {
		return nil, fmt.Errorf("setting mode %o on %s: %w: %w", d.mode, p, err, tpmrc.TPMFail)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w: %w", p, err, tpmrc.TPMFail)
	}
	plain, err := DecodeFile(data, d.key)
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", p, err)
	}
	return plain, nil
}

// Store encodes data and replaces the file for name atomically: write to
// TMP2-00.<name>, fsync, rename, fsync the directory.
func (d *Dir) Store(name string, data []byte) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	enc, err := EncodeFile(data, d.key)
	if err != nil {
		return fmt.Errorf("storing %s: %w", name, err)
	}
	tmp := filepath.Join(d.dir, "TMP2-00."+name)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, d.mode)
	if err != nil {
		return fmt.Errorf("storing %s: %w: %w", name, err, tpmrc.TPMFail)
	}
	_, werr := f.Write(enc)
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w; check free space and permissions: %w", tmp, werr, tpmrc.TPMFail)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("renaming %s to %s: %w: %w", tmp, p, err, tpmrc.TPMFail)
	}
	return syncDir(d.dir)
}

func syncDir(dir string) error {
	if err := atomicfile.SyncDir(dir); err != nil {
		return fmt.Errorf("%w: %w", err, tpmrc.TPMFail)
	}
	return nil
}

// Delete removes the file for name. A missing file is an error only when
// mustExist is set.
func (d *Dir) Delete(name string, mustExist bool) error {
	p, err := d.path(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) && !mustExist {
			return nil
		}
		return fmt.Errorf("deleting %s: %w: %w", p, err, tpmrc.TPMFail)
	}
	return syncDir(d.dir)
}

// States lists the stored states with their file sizes.
func (d *Dir) States() ([]StateInfo, error) {
	states := []StateInfo{}
	for _, name := range blobNames {
		fi, err := os.Lstat(filepath.Join(d.dir, fileName(name)))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("listing states in %s: %w", d.dir, err)
		}
		states = append(states, StateInfo{Name: name, Size: fi.Size()})
	}
	return states, nil
}
