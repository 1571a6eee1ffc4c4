package keystore

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
)

// syncDir makes creations, renames and removals in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return permOr(err, "open directory %s to fsync it: %v; check its owner and mode", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return errf(errGeneric, err, "fsync directory %s: %v; check the file system for errors", dir, err)
	}
	return nil
}

// writeFileAtomic replaces dir/name with data (mode 0600): a temp file,
// fsync, rename, fsync of the directory. Readers see the old or the new
// content. The temp name starts with a dot, so List never reports it.
func writeFileAtomic(dir, name string, data []byte) error {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return permOr(err, "create a temporary file in %s: %v; check that the directory is owned by this user, mode 0700, and the disk is not full", dir, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return permOr(err, "chmod %s: %v", tmp, err)
	}
	if _, err := f.Write(data); err != nil {
		return errf(errGeneric, err, "write %s: %v; free disk space and retry", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return errf(errGeneric, err, "fsync %s: %v; check the file system for errors", tmp, err)
	}
	if err := f.Close(); err != nil {
		return errf(errGeneric, err, "close %s: %v", tmp, err)
	}
	dst := filepath.Join(dir, name)
	if err := os.Rename(tmp, dst); err != nil {
		return permOr(err, "rename %s to %s: %v", tmp, dst, err)
	}
	ok = true
	return syncDir(dir)
}

// openLock opens dir/.lock for flock(2).
func openLock(dir string) (*os.File, error) {
	p := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, permOr(err, "open keystore lock file %s: %v; writing to the keystore needs its owner (usually root: sudo)", p, err)
	}
	return f, nil
}

// flock takes an exclusive flock on f, waiting for other writers.
func flock(f *os.File, dir string) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return errf(errGeneric, err, "lock keystore %s: %v; check that %s is on a local file system that supports flock", dir, err, dir)
		}
		return nil
	}
}

func funlock(f *os.File) {
	// Unlock cannot meaningfully fail on a valid fd; closing would also release it.
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
}

// lockDir takes the writers' lock of dir until the returned func is called.
func lockDir(dir string) (func(), error) {
	f, err := openLock(dir)
	if err != nil {
		return nil, err
	}
	if err := flock(f, dir); err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil
}
