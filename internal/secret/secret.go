// Package secret holds key material in memory of its own: an anonymous
// mapping locked into RAM (never swapped), left out of core dumps and not
// inherited by child processes, and wiped when it is closed.
//
// What it covers, honestly: the bytes a Bytes holds. Go's crypto packages
// keep their own copies of a key once given one (an AES key schedule, an
// HMAC's padded keys, HKDF's intermediate values) in ordinary heap memory
// that this package cannot lock or wipe; callers keep the raw keys and
// every key vtpm derives in Bytes and build those objects from them for as
// short a time as they can.
package secret

import (
	"crypto/rand"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrNotLocked is wrapped by the error LockErr returns when the memory
// could not be locked (RLIMIT_MEMLOCK exhausted).
var ErrNotLocked = errors.New("key memory is not locked")

// unmap is a seam: tests check that the memory is zero when it is unmapped.
var unmap = unix.Munmap

// Bytes is key material in its own mapping. The zero value and nil hold
// nothing.
type Bytes struct {
	b       []byte
	lockErr error
}

// New allocates n bytes of key memory, zeroed. It fails only when the
// mapping cannot be made; memory that cannot be locked is still returned,
// with LockErr saying why, so that callers decide whether to go on.
func New(n int) (*Bytes, error) {
	if n <= 0 {
		return nil, fmt.Errorf("key memory: size %d", n)
	}
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("key memory: mmap %d bytes: %w", n, err)
	}
	s := &Bytes{b: b}
	if err := unix.Mlock(b); err != nil {
		s.lockErr = fmt.Errorf("%w: mlock: %w (raise the memlock limit: ulimit -l, or LimitMEMLOCK= in the service unit)", ErrNotLocked, err)
	}
	// Best effort: both only narrow who can see the page.
	unix.Madvise(b, unix.MADV_DONTDUMP)
	unix.Madvise(b, unix.MADV_DONTFORK)
	return s, nil
}

// From moves src into new key memory: it copies src and wipes it.
func From(src []byte) (*Bytes, error) {
	defer clear(src)
	s, err := New(len(src))
	if err != nil {
		return nil, err
	}
	copy(s.b, src)
	return s, nil
}

// Random returns n random bytes in key memory.
func Random(n int) (*Bytes, error) {
	s, err := New(n)
	if err != nil {
		return nil, err
	}
	rand.Read(s.b)
	return s, nil
}

// Bytes is the memory itself. It must not be kept or used after Close.
func (s *Bytes) Bytes() []byte {
	if s == nil {
		return nil
	}
	return s.b
}

// Len is the size of the key material, 0 once closed.
func (s *Bytes) Len() int { return len(s.Bytes()) }

// LockErr is nil when the memory is locked into RAM; otherwise it wraps
// ErrNotLocked and says why.
func (s *Bytes) LockErr() error {
	if s == nil {
		return nil
	}
	return s.lockErr
}

// Close zeroes the memory, unlocks and unmaps it. It is safe to call twice
// and on nil.
func (s *Bytes) Close() {
	if s == nil || s.b == nil {
		return
	}
	clear(s.b)
	if s.lockErr == nil {
		unix.Munlock(s.b)
	}
	unmap(s.b)
	s.b = nil
}

// Wipe is Close.
func (s *Bytes) Wipe() { s.Close() }
