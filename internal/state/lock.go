package state

import "vtpm/internal/seal"

// ErrLocked is matched by the error of opening or locking a directory whose
// lock another TPM process (or another opening in this process) holds.
var ErrLocked = seal.ErrLocked

// Locked is a state directory whose lock this process holds.
type Locked struct {
	dir    string
	unlock func() error
}

// Lock takes dir's lock without opening its state, for operations on the
// directory as a whole: creating a TPM's identity and key, removing its
// state or moving it aside. It is the lock sealed state and swtpm's files
// take when they are opened, so it fails (matching [ErrLocked]) while a TPM
// process serves dir. dir must exist.
func Lock(dir string) (*Locked, error) {
	unlock, err := seal.Lock(dir)
	if err != nil {
		return nil, err
	}
	return &Locked{dir: dir, unlock: unlock}, nil
}

// Dir returns the locked directory.
func (l *Locked) Dir() string { return l.dir }

// Unlock releases the lock.
func (l *Locked) Unlock() error { return l.unlock() }

// Remove deletes the TPM state in the locked directory, as [Remove] does.
func (l *Locked) Remove() error { return removeState(l.dir) }
