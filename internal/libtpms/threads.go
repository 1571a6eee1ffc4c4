package libtpms

/*
long vtpm_all_threads_syscall(long nr, long a1, long a2, long a3);
*/
import "C"

import "syscall"

// AllThreadsSyscall makes the system call trap(a1, a2, a3) on every thread
// of the process, this one last, and returns the first error. It is what
// syscall.AllThreadsSyscall does for programs without cgo, which refuses to
// run in this one: the Go runtime cannot reach threads that C code started.
// It lives here because this is the program's only cgo package; the sandbox
// uses it to confine a running process instead of re-executing it
// (sandbox.UseAllThreads).
//
// It is meant for system calls whose effect is per thread and inherited by
// new threads (prctl(PR_SET_NO_NEW_PRIVS), landlock_restrict_self): a thread
// started during the call is reached too. When it fails, some threads may
// have made the call and others not.
func AllThreadsSyscall(trap, a1, a2, a3 uintptr) error {
	if r := C.vtpm_all_threads_syscall(C.long(trap), C.long(a1), C.long(a2), C.long(a3)); r != 0 {
		return syscall.Errno(-r)
	}
	return nil
}
