package seal

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"vtpm/internal/errdefs"
)

// LockName is the lock file swtpm 0.7.1 uses in its state directory; using
// the same file and lock kind makes swtpm and vtpm exclude each other.
const LockName = ".lock"

// ErrLocked reports a state directory held by another process.
var ErrLocked = newSentinel("state directory is in use by another TPM process", errdefs.ErrFailedPrecondition)

type fileID struct{ dev, ino uint64 }

// POSIX locks never conflict within one process, and closing any fd of the
// lock file drops the lock, so a second Open in this process must be refused
// before it opens the file.
var (
	lockedMu sync.Mutex
	locked   = map[fileID]bool{}
)

type dirLock struct {
	f  *os.File
	id fileID
}

func lockDir(dir string, mode os.FileMode) (*dirLock, error) {
	path := filepath.Join(dir, LockName)
	lockedMu.Lock()
	defer lockedMu.Unlock()
	if st, err := os.Stat(path); err == nil {
		if locked[idOf(st)] {
			return nil, errf(ErrLocked, "state directory %s is already open in this process", dir)
		}
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, mode)
	if err != nil {
		return nil, lockFileError(dir, path, err)
	}
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: io.SeekStart}
	if err := syscall.FcntlFlock(f.Fd(), syscall.F_SETLK, &lk); err != nil {
		defer f.Close()
		if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EACCES) {
			who := ""
			probe := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: io.SeekStart}
			if syscall.FcntlFlock(f.Fd(), syscall.F_GETLK, &probe) == nil && probe.Type != syscall.F_UNLCK && probe.Pid > 0 {
				who = fmt.Sprintf(" (pid %d)", probe.Pid)
			}
			return nil, errf(ErrLocked, "state directory %s is in use by another TPM process%s", dir, who).
				with(errdefs.Advise("stop it first"))
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat lock file %s: %w", path, err)
	}
	l := &dirLock{f: f, id: idOf(st)}
	locked[l.id] = true
	return l, nil
}

func (l *dirLock) unlock() error {
	lockedMu.Lock()
	defer lockedMu.Unlock()
	delete(locked, l.id)
	// Closing the only fd releases the POSIX lock.
	return l.f.Close()
}

func idOf(st os.FileInfo) fileID {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return fileID{dev: uint64(s.Dev), ino: s.Ino}
	}
	return fileID{}
}

// Lock takes the state directory's lock without opening its state, for
// operations that move state aside (reprovisioning). Call the returned
// function to release it.
func Lock(dir string) (unlock func() error, err error) {
	l, err := lockDir(dir, 0o600)
	if err != nil {
		return nil, err
	}
	return l.unlock, nil
}

// lockFileError says why the lock file cannot be opened; a permission error
// is most often a TPM process started as another user than the directory's
// owner.
func lockFileError(dir, path string, err error) error {
	e := errdefs.Wrap(errdefs.ErrInternal, err, "open lock file %s", path)
	const check = "check the directory's owner and permissions"
	switch {
	case errors.Is(err, fs.ErrPermission):
		e.Kind = errdefs.ErrPermissionDenied
		return e.With(errdefs.Do(errdefs.ActionRunAsOwner, "path", dir).WithNote(check))
	case errors.Is(err, fs.ErrNotExist):
		e.Kind = errdefs.ErrNotFound
	}
	return e.With(errdefs.Advise(check))
}
