package sandbox

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Seccomp actions, as --seccomp action= names them.
const (
	SeccompKill = "kill" // an unlisted system call kills the process (default, as swtpm)
	SeccompLog  = "log"  // it is logged by the kernel (audit) and allowed
	SeccompNone = "none" // no filter
)

// verdict is what the filter does with one system call.
type verdict int

const (
	allow        verdict = iota
	deny                 // EPERM: calls a well-behaved instance never makes, refused without killing it
	noSys                // ENOSYS: steers the C library to an older call that the filter can inspect
	allowIfSet           // allowed when arg has all bits of mask set, else denied
	allowIfUnset         // allowed when arg has none of the bits of mask set, else denied
)

// rule is one system call of the filter.
type rule struct {
	nr   uintptr
	what verdict
	arg  int    // for allowIf*
	mask uint32 // for allowIf*; only the argument's low 32 bits are tested
}

// commonRules are the system calls an instance makes once it serves, on every
// architecture: the Go runtime (threads, signals, scheduler, netpoller,
// memory), glibc and libcrypto inside libtpms (thread creation, malloc
// arenas, getrandom), and the instance's own I/O (state files written
// crash-safely and locked, generation records in the keystore, the control
// and data sockets, SCM_RIGHTS). They were collected with strace -f on
// instances driven by tpm2-tools, swtpm_ioctl and QEMU guests.
//
// Listed first are the calls made on every TPM command, so that the linear
// filter finds them early.
var commonRules = []rule{
	{nr: unix.SYS_READ}, {nr: unix.SYS_WRITE}, {nr: unix.SYS_FUTEX},
	{nr: unix.SYS_EPOLL_PWAIT}, {nr: unix.SYS_NANOSLEEP}, {nr: unix.SYS_FCNTL},
	{nr: unix.SYS_ACCEPT4}, {nr: unix.SYS_SETSOCKOPT}, {nr: unix.SYS_EPOLL_CTL},
	{nr: unix.SYS_CLOSE}, {nr: unix.SYS_GETSOCKNAME}, {nr: unix.SYS_DUP},
	{nr: unix.SYS_RECVMSG}, {nr: unix.SYS_SENDMSG}, {nr: unix.SYS_RECVFROM},
	{nr: unix.SYS_SENDTO}, {nr: unix.SYS_GETPEERNAME}, {nr: unix.SYS_GETSOCKOPT},
	{nr: unix.SYS_SHUTDOWN}, {nr: unix.SYS_ACCEPT},
	{nr: unix.SYS_READV}, {nr: unix.SYS_WRITEV}, {nr: unix.SYS_PREAD64},
	{nr: unix.SYS_PWRITE64}, {nr: unix.SYS_LSEEK},

	// Files: state, keystore records, locks, pid file.
	{nr: unix.SYS_OPENAT}, {nr: unix.SYS_NEWFSTATAT}, {nr: unix.SYS_FSTAT},
	{nr: unix.SYS_STATX}, {nr: unix.SYS_GETDENTS64}, {nr: unix.SYS_FSYNC},
	{nr: unix.SYS_FDATASYNC}, {nr: unix.SYS_FTRUNCATE}, {nr: unix.SYS_FCHMOD},
	{nr: unix.SYS_FLOCK}, {nr: unix.SYS_RENAMEAT}, {nr: unix.SYS_RENAMEAT2},
	{nr: unix.SYS_LINKAT}, {nr: unix.SYS_UNLINKAT}, {nr: unix.SYS_MKDIRAT},
	{nr: unix.SYS_READLINKAT}, {nr: unix.SYS_FACCESSAT}, {nr: unix.SYS_FACCESSAT2},
	{nr: unix.SYS_DUP3},

	// Memory. No new executable mappings: everything that runs is mapped at start.
	{nr: unix.SYS_MMAP, what: allowIfUnset, arg: 2, mask: unix.PROT_EXEC},
	{nr: unix.SYS_MPROTECT, what: allowIfUnset, arg: 2, mask: unix.PROT_EXEC},
	{nr: unix.SYS_MUNMAP}, {nr: unix.SYS_MADVISE}, {nr: unix.SYS_MREMAP},
	{nr: unix.SYS_BRK}, {nr: unix.SYS_MLOCK}, {nr: unix.SYS_MUNLOCK},

	// Threads, scheduling, signals, time.
	{nr: unix.SYS_CLONE, what: allowIfSet, arg: 0, mask: unix.CLONE_THREAD}, // threads, never processes
	{nr: unix.SYS_CLONE3, what: noSys},                                      // its flags are in memory the filter cannot read: glibc falls back to clone
	{nr: unix.SYS_SET_ROBUST_LIST}, {nr: unix.SYS_RSEQ}, {nr: unix.SYS_SCHED_YIELD},
	{nr: unix.SYS_SCHED_GETAFFINITY}, {nr: unix.SYS_GETPID}, {nr: unix.SYS_GETTID},
	{nr: unix.SYS_TGKILL}, {nr: unix.SYS_EXIT}, {nr: unix.SYS_EXIT_GROUP},
	{nr: unix.SYS_RESTART_SYSCALL}, {nr: unix.SYS_RT_SIGACTION},
	{nr: unix.SYS_RT_SIGPROCMASK}, {nr: unix.SYS_RT_SIGRETURN},
	{nr: unix.SYS_SIGALTSTACK}, {nr: unix.SYS_CLOCK_GETTIME},
	{nr: unix.SYS_CLOCK_NANOSLEEP}, {nr: unix.SYS_CLOCK_GETRES},
	{nr: unix.SYS_GETTIMEOFDAY}, {nr: unix.SYS_EPOLL_CREATE1},
	{nr: unix.SYS_EPOLL_PWAIT2}, {nr: unix.SYS_EVENTFD2}, {nr: unix.SYS_PIPE2},
	{nr: unix.SYS_PPOLL}, {nr: unix.SYS_GETRANDOM}, {nr: unix.SYS_UNAME},
	{nr: unix.SYS_GETUID}, {nr: unix.SYS_GETEUID}, {nr: unix.SYS_GETGID},
	{nr: unix.SYS_GETEGID}, {nr: unix.SYS_GETRLIMIT},

	// The network: the listeners exist before the filter; nothing new is
	// opened, bound or connected. Refused, not killed, so that a library
	// that tries gets an error.
	{nr: unix.SYS_SOCKET, what: deny}, {nr: unix.SYS_SOCKETPAIR, what: deny},
	{nr: unix.SYS_CONNECT, what: deny}, {nr: unix.SYS_BIND, what: deny},
	{nr: unix.SYS_LISTEN, what: deny},
}

// BPF building blocks (struct seccomp_data offsets).
const (
	offNr   = 0
	offArch = 4
	offArgs = 16
)

func stmt(code uint16, k uint32) unix.SockFilter { return unix.SockFilter{Code: code, K: k} }

func jump(code uint16, k uint32, jt, jf uint8) unix.SockFilter {
	return unix.SockFilter{Code: code, Jt: jt, Jf: jf, K: k}
}

// buildFilter compiles rules into a classic BPF program for arch. Unlisted
// system calls get defaultAction; so do system calls of another ABI (x32 on
// amd64, for instance), which would otherwise bypass the numbers checked.
func buildFilter(arch uint32, rules []rule, maxNr uint32, defaultAction, denyAction uint32) []unix.SockFilter {
	const (
		ldW  = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeq  = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		jge  = unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K
		jset = unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K
		ret  = unix.BPF_RET | unix.BPF_K
	)
	prog := []unix.SockFilter{
		stmt(ldW, offArch),
		jump(jeq, arch, 1, 0),
		stmt(ret, unix.SECCOMP_RET_KILL_PROCESS),
		stmt(ldW, offNr),
		jump(jge, maxNr, 0, 1),
		stmt(ret, unix.SECCOMP_RET_KILL_PROCESS),
	}
	for _, r := range rules {
		var body []unix.SockFilter
		switch r.what {
		case allow:
			body = []unix.SockFilter{stmt(ret, unix.SECCOMP_RET_ALLOW)}
		case deny:
			body = []unix.SockFilter{stmt(ret, denyAction)}
		case noSys:
			body = []unix.SockFilter{stmt(ret, unix.SECCOMP_RET_ERRNO|uint32(unix.ENOSYS))}
		case allowIfSet, allowIfUnset:
			// A holds the argument's low word; jset jumps when A&mask != 0.
			jt, jf := uint8(1), uint8(0) // set: denied
			if r.what == allowIfSet {
				jt, jf = 0, 1
			}
			body = []unix.SockFilter{
				stmt(ldW, uint32(offArgs+8*r.arg)),
				jump(jset, r.mask, jt, jf),
				stmt(ret, unix.SECCOMP_RET_ALLOW),
				stmt(ret, denyAction),
			}
		}
		// Every body ends in ret: a rule that does not match leaves A
		// holding the system call number for the next one.
		prog = append(prog, jump(jeq, uint32(r.nr), 0, uint8(len(body))))
		prog = append(prog, body...)
	}
	return append(prog, stmt(ret, defaultAction))
}

// seccompActions maps --seccomp action= to the filter's actions for
// unlisted calls and for refused ones.
func seccompActions(action string) (unlisted, refused uint32, err error) {
	switch action {
	case "", SeccompKill:
		return unix.SECCOMP_RET_KILL_PROCESS, unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM), nil
	case SeccompLog:
		return unix.SECCOMP_RET_LOG, unix.SECCOMP_RET_LOG, nil
	}
	return 0, 0, fmt.Errorf("seccomp action %q: want kill, log or none", action)
}

// SeccompAvailable reports whether the kernel can filter system calls.
func SeccompAvailable() error {
	if auditArch == 0 {
		return fmt.Errorf("vtpm has no seccomp allow-list for %s; run on amd64 or arm64", runtime.GOARCH)
	}
	if _, err := unix.PrctlRetInt(unix.PR_GET_SECCOMP, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("kernel without seccomp (CONFIG_SECCOMP_FILTER): %w", err)
	}
	act := uint32(unix.SECCOMP_RET_KILL_PROCESS)
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_GET_ACTION_AVAIL, 0, uintptr(unsafe.Pointer(&act))); errno != 0 {
		return fmt.Errorf("seccomp cannot kill a process on this kernel (it needs Linux 4.14 or newer): %w", errno)
	}
	return nil
}

// installSeccomp installs the filter on every thread of the process.
func installSeccomp(action string) error {
	unlisted, refused, err := seccompActions(action)
	if err != nil {
		return err
	}
	prog := buildFilter(auditArch, append(commonRules, archRules...), maxSyscall, unlisted, refused)
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
	switch {
	case errno != 0:
		return fmt.Errorf("install the seccomp filter: %w", errno)
	case r != 0:
		return fmt.Errorf("install the seccomp filter: thread %d could not be synchronised (it has a different filter)", r)
	}
	return nil
}
