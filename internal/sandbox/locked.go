package sandbox

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Locked is memory for key material: its own anonymous mapping, locked into
// RAM (never swapped), left out of core dumps and not inherited by children,
// and wiped by Wipe.
type Locked struct {
	b []byte
}

// LockedBytes allocates n bytes of locked memory. It fails when the memory
// cannot be locked (RLIMIT_MEMLOCK exhausted); the error says so.
func LockedBytes(n int) (*Locked, error) {
	if n <= 0 {
		return nil, fmt.Errorf("locked memory: size %d", n)
	}
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("locked memory: mmap %d bytes: %w", n, err)
	}
	if err := unix.Mlock(b); err != nil {
		unix.Munmap(b)
		return nil, fmt.Errorf("locked memory: mlock: %w (raise the memlock limit: ulimit -l, or LimitMEMLOCK= in the service unit)", err)
	}
	// Best effort: both only narrow who can see the page.
	unix.Madvise(b, unix.MADV_DONTDUMP)
	unix.Madvise(b, unix.MADV_DONTFORK)
	return &Locked{b: b}, nil
}

// Bytes is the locked memory. It must not be used after Wipe.
func (l *Locked) Bytes() []byte { return l.b }

// Wipe zeroes the memory, unlocks and unmaps it. It is safe to call twice
// and on nil.
func (l *Locked) Wipe() {
	if l == nil || l.b == nil {
		return
	}
	clear(l.b)
	unix.Munlock(l.b)
	unix.Munmap(l.b)
	l.b = nil
}
