//go:build !amd64 && !arm64

package sandbox

// No filter is built for this architecture: SeccompAvailable says so.
const (
	auditArch  = 0
	maxSyscall = 0
)

var archRules []rule
