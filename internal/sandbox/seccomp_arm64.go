package sandbox

import "golang.org/x/sys/unix"

const (
	auditArch  = unix.AUDIT_ARCH_AARCH64
	maxSyscall = 0x40000000
)

// archRules: arm64 has only the generic system calls, all in commonRules.
var archRules []rule
