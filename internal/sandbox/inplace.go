package sandbox

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// AllThreadsFunc makes one system call on every thread of the process (the
// arguments after the third are zero) and returns the first error.
type AllThreadsFunc func(trap, a1, a2, a3 uintptr) error

// allThreads is how Enter reaches every thread when the kernel cannot apply
// Landlock to all of them itself. Go's syscall.AllThreadsSyscall serves
// programs without cgo; it refuses in a cgo program, which must bring its
// own (UseAllThreads).
var allThreads atomic.Pointer[AllThreadsFunc]

// UseAllThreads sets how Enter makes a system call on every thread. A
// program that uses cgo calls it before Enter, since Go's
// syscall.AllThreadsSyscall refuses to run there; without it Enter falls back
// to re-executing the program.
func UseAllThreads(f AllThreadsFunc) { allThreads.Store(&f) }

func goAllThreads(trap, a1, a2, a3 uintptr) error {
	if _, _, errno := syscall.AllThreadsSyscall(trap, a1, a2, a3); errno != 0 {
		return errno
	}
	return nil
}

// How Landlock was entered (Sandbox.Method).
const (
	MethodTSYNC      = "all threads by the kernel" // LANDLOCK_RESTRICT_SELF_TSYNC (Landlock ABI 8)
	MethodAllThreads = "each thread in place"      // every thread restricts itself (AllThreadsFunc)
	MethodReexec     = "re-executed"               // the program restarted from a restricted thread
)

// landlockErrata returns the kernel's bitmask of fixed Landlock errata.
func landlockErrata() uint64 {
	v, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, 0, unix.LANDLOCK_CREATE_RULESET_ERRATA)
	if errno != 0 {
		return 0
	}
	return uint64(v)
}

// erratumSignalScope is Landlock erratum 2 (fixed in the ABI 6 kernels that
// report it): before the fix, threads in sibling domains could not signal
// each other under LANDLOCK_SCOPE_SIGNAL, which the Go runtime needs and
// which restricting threads one by one produces.
const erratumSignalScope = 1 << 1

// restrictAll confines every thread of the running process with the ruleset
// fd, with no second program start: with the kernel's
// LANDLOCK_RESTRICT_SELF_TSYNC where it has it, else by having each thread
// restrict itself. It sets no_new_privs on the threads it restricts. On
// failure some threads may be restricted; the caller re-executes from one,
// which ends the others.
func restrictAll(fd, abi int) (method string, err error) {
	var tsyncErr error
	if abi >= 8 {
		// The kernel restricts the other threads with this one, and gives
		// them its no_new_privs.
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return "", fmt.Errorf("no_new_privs: %w", err)
		}
		_, _, errno := unix.Syscall(unix.SYS_LANDLOCK_RESTRICT_SELF, uintptr(fd), unix.LANDLOCK_RESTRICT_SELF_TSYNC, 0)
		if errno == 0 {
			return MethodTSYNC, nil
		}
		tsyncErr = fmt.Errorf("landlock_restrict_self(TSYNC): %w", errno)
	}
	if abi >= 6 && landlockErrata()&erratumSignalScope == 0 {
		return "", errors.Join(tsyncErr, errors.New("the kernel lacks the Landlock fix that lets threads restricted one by one signal each other (erratum 2)"))
	}
	all := goAllThreads
	if f := allThreads.Load(); f != nil {
		all = *f
	}
	if err := all(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); err != nil {
		return "", errors.Join(tsyncErr, fmt.Errorf("no_new_privs on every thread: %w", err))
	}
	if err := all(unix.SYS_LANDLOCK_RESTRICT_SELF, uintptr(fd), 0, 0); err != nil {
		return "", errors.Join(tsyncErr, fmt.Errorf("landlock_restrict_self on every thread: %w", err))
	}
	return MethodAllThreads, nil
}
