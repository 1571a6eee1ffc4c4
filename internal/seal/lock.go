package seal

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
)

// LockName is the lock file swtpm 0.7.1 uses in its state directory; using
// the same file and lock kind makes swtpm and vtpm exclude each other.
const LockName = ".lock"

// ErrLocked reports a state directory held by another process.
var ErrLocked = errors.New("state directory is in use by another TPM process")

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
		return nil, fmt.Errorf("open lock file %s: %w (check the directory's owner and permissions)", path, err)
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
			return nil, errf(ErrLocked, "state directory %s is in use by another TPM process%s; stop it first", dir, who)
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
