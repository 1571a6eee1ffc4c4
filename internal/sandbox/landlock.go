package sandbox

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// landlockAttr is struct landlock_ruleset_attr as of ABI 6; the kernel
// accepts it from every ABI that knows the fields set (unset ones are zero).
type landlockAttr struct {
	handledFS  uint64
	handledNet uint64
	scoped     uint64
}

// landlockPathBeneath is struct landlock_path_beneath_attr, which the kernel
// reads packed (12 bytes): Go's trailing padding is never read.
type landlockPathBeneath struct {
	allowed  uint64
	parentFD int32
}

// landlockRuleNetPort is LANDLOCK_RULE_NET_PORT (ABI 4), which x/sys lacks.
const landlockRuleNetPort = 2

type landlockNetPort struct {
	allowed uint64
	port    uint64
}

// LandlockABI returns the kernel's Landlock ABI version, or 0 and why when
// Landlock is not usable.
func LandlockABI() (int, error) {
	v, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, 0, unix.LANDLOCK_CREATE_RULESET_VERSION)
	switch {
	case errno == unix.ENOSYS:
		return 0, errors.New("kernel without Landlock (it needs Linux 5.13 or newer)")
	case errno == unix.EOPNOTSUPP:
		return 0, errors.New("Landlock is built into the kernel but not enabled (add landlock to the lsm= boot parameter)")
	case errno != 0:
		return 0, fmt.Errorf("landlock_create_ruleset: %w", errno)
	}
	return int(v), nil
}

// Write-side file system rights by ABI. Reading and executing are not
// handled, so they stay as the file permissions say: the dynamic loader,
// libcrypto's configuration and the host keystore remain readable.
const (
	fsWriteV1 = unix.LANDLOCK_ACCESS_FS_WRITE_FILE | unix.LANDLOCK_ACCESS_FS_REMOVE_DIR |
		unix.LANDLOCK_ACCESS_FS_REMOVE_FILE | unix.LANDLOCK_ACCESS_FS_MAKE_CHAR |
		unix.LANDLOCK_ACCESS_FS_MAKE_DIR | unix.LANDLOCK_ACCESS_FS_MAKE_REG |
		unix.LANDLOCK_ACCESS_FS_MAKE_SOCK | unix.LANDLOCK_ACCESS_FS_MAKE_FIFO |
		unix.LANDLOCK_ACCESS_FS_MAKE_BLOCK | unix.LANDLOCK_ACCESS_FS_MAKE_SYM
	fsRefer    = unix.LANDLOCK_ACCESS_FS_REFER    // ABI 2
	fsTruncate = unix.LANDLOCK_ACCESS_FS_TRUNCATE // ABI 3

	// What a writable directory grants beneath it (no device nodes, no FIFOs).
	dirWrite = unix.LANDLOCK_ACCESS_FS_WRITE_FILE | unix.LANDLOCK_ACCESS_FS_REMOVE_DIR |
		unix.LANDLOCK_ACCESS_FS_REMOVE_FILE | unix.LANDLOCK_ACCESS_FS_MAKE_DIR |
		unix.LANDLOCK_ACCESS_FS_MAKE_REG | fsRefer | fsTruncate
	// What a runtime directory grants: the sockets and the pid file (written
	// to a temporary name and renamed), and removing them on exit.
	runtimeDir = unix.LANDLOCK_ACCESS_FS_MAKE_SOCK | unix.LANDLOCK_ACCESS_FS_MAKE_REG |
		unix.LANDLOCK_ACCESS_FS_REMOVE_FILE | unix.LANDLOCK_ACCESS_FS_WRITE_FILE | fsTruncate
	// What a writable file grants.
	fileWrite = unix.LANDLOCK_ACCESS_FS_WRITE_FILE | fsTruncate
)

func handledFS(abi int) uint64 {
	h := uint64(fsWriteV1)
	if abi >= 2 {
		h |= fsRefer
	}
	if abi >= 3 {
		h |= fsTruncate
	}
	return h
}

// newRuleset builds the Landlock ruleset for p and returns its descriptor,
// which the caller closes.
func newRuleset(p *Policy, abi int) (int, error) {
	attr := landlockAttr{handledFS: handledFS(abi)}
	if abi >= 4 {
		// Binding is limited to the configured ports. Connecting is not
		// handled here: a keystore sealed to a TCP host TPM connects while
		// starting; the seccomp filter refuses connect once serving.
		attr.handledNet = unix.LANDLOCK_ACCESS_NET_BIND_TCP
	}
	if abi >= 6 {
		attr.scoped = unix.LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | unix.LANDLOCK_SCOPE_SIGNAL
	}
	size := unsafe.Sizeof(attr)
	if abi < 6 {
		size = unsafe.Offsetof(attr.scoped)
	}
	if abi < 4 {
		size = unsafe.Offsetof(attr.handledNet)
	}
	r, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, uintptr(unsafe.Pointer(&attr)), size, 0)
	if errno != 0 {
		return -1, fmt.Errorf("landlock_create_ruleset: %w", errno)
	}
	fd := int(r)
	if err := addRules(fd, p, abi, attr.handledFS); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func addRules(fd int, p *Policy, abi int, handled uint64) error {
	add := func(path string, access uint64) error {
		access &= handled
		pfd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("landlock rule for %s: %w", path, err)
		}
		defer unix.Close(pfd)
		rule := landlockPathBeneath{allowed: access, parentFD: int32(pfd)}
		_, _, errno := unix.Syscall6(unix.SYS_LANDLOCK_ADD_RULE, uintptr(fd), unix.LANDLOCK_RULE_PATH_BENEATH, uintptr(unsafe.Pointer(&rule)), 0, 0, 0)
		if errno != 0 {
			return fmt.Errorf("landlock rule for %s: %w", path, errno)
		}
		return nil
	}
	for _, d := range p.WriteDirs {
		if err := add(d, dirWrite); err != nil {
			return err
		}
	}
	for _, d := range p.RuntimeDirs {
		if err := add(d, runtimeDir); err != nil {
			return err
		}
	}
	for _, f := range p.WriteFiles {
		if err := add(f, fileWrite); err != nil {
			return err
		}
	}
	if abi >= 4 {
		for _, port := range p.BindTCP {
			rule := landlockNetPort{allowed: unix.LANDLOCK_ACCESS_NET_BIND_TCP, port: uint64(port)}
			_, _, errno := unix.Syscall6(unix.SYS_LANDLOCK_ADD_RULE, uintptr(fd), landlockRuleNetPort, uintptr(unsafe.Pointer(&rule)), 0, 0, 0)
			if errno != 0 {
				return fmt.Errorf("landlock rule for TCP port %d: %w", port, errno)
			}
		}
	}
	return nil
}

// restrictThread applies the ruleset fd to the calling thread, which must be
// locked (runtime.LockOSThread) and must have no_new_privs set.
func restrictThread(fd int) error {
	if _, _, errno := unix.Syscall(unix.SYS_LANDLOCK_RESTRICT_SELF, uintptr(fd), 0, 0); errno != 0 {
		return fmt.Errorf("landlock_restrict_self: %w", errno)
	}
	return nil
}
