package sandbox

import "golang.org/x/sys/unix"

const (
	auditArch = unix.AUDIT_ARCH_X86_64
	// maxSyscall: numbers from here on are x32 system calls (__X32_SYSCALL_BIT).
	maxSyscall = 0x40000000
)

// archRules are the amd64 system calls with no generic equivalent that glibc
// and the Go runtime still use.
var archRules = []rule{
	{nr: unix.SYS_OPEN}, {nr: unix.SYS_STAT}, {nr: unix.SYS_LSTAT},
	{nr: unix.SYS_ACCESS}, {nr: unix.SYS_RENAME}, {nr: unix.SYS_LINK},
	{nr: unix.SYS_UNLINK}, {nr: unix.SYS_MKDIR}, {nr: unix.SYS_DUP2},
	{nr: unix.SYS_EPOLL_WAIT}, {nr: unix.SYS_POLL}, {nr: unix.SYS_TIME},
	{nr: unix.SYS_READLINK},
}
