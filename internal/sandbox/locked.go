package sandbox

import (
	"vtpm/internal/secret"
)

// Locked is memory for key material (see package secret).
type Locked = secret.Bytes

// LockedBytes allocates n bytes of locked memory. Unlike secret.New it
// fails when the memory cannot be locked (RLIMIT_MEMLOCK exhausted); the
// error says so.
func LockedBytes(n int) (*Locked, error) {
	l, err := secret.New(n)
	if err != nil {
		return nil, err
	}
	if err := l.LockErr(); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}
