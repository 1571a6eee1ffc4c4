package hostcheck

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"

	"vtpm/internal/errdefs"
)

// QEMUSandbox is QEMU's own seccomp policy for every VM: no obsolete
// system calls, no set*id, no fork or exec, no scheduler or resource
// changes. It rules out -daemonize and -runas (both come after the
// filter), so QEMU is started detached and as its user instead.
const QEMUSandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// DefaultQEMUUsers are tried in order for QEMU when vm start runs as root
// and the VM names no user: libvirt's and distributions' QEMU users, then
// nobody. QEMU is the part of a VM a guest attacks, so it never runs as
// root.
var DefaultQEMUUsers = []string{"libvirt-qemu", "qemu", "nobody"}

// QEMUUser is whom QEMU runs as when started by this process, configured
// being the VM's choice ("" for the default): name "" when this process is
// not root (QEMU then runs as the caller), else the named user or the
// first of DefaultQEMUUsers that exists. An unknown user, an id that does
// not parse, or uid 0 is an error: the privilege drop fails closed.
func QEMUUser(configured string) (name string, uid, gid int, err error) {
	if os.Geteuid() != 0 {
		return "", os.Geteuid(), os.Getegid(), nil
	}
	candidates := DefaultQEMUUsers
	if configured != "" {
		candidates = []string{configured}
	}
	for _, c := range candidates {
		u, err := user.Lookup(c)
		if err != nil {
			if u, err = user.LookupId(c); err != nil {
				continue
			}
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err := errors.Join(err1, err2); err != nil {
			return "", 0, 0, fmt.Errorf("QEMU user %s: %w", c, err)
		}
		if uid == 0 {
			return "", 0, 0, errdefs.New(errdefs.ErrFailedPrecondition, "QEMU user %s has uid 0; QEMU never runs as root", c)
		}
		return u.Username, uid, gid, nil
	}
	if configured != "" {
		return "", 0, 0, errdefs.New(errdefs.ErrFailedPrecondition, "qemu_user %q: no such user", configured).
			With(advise("create the user, or set qemu_user to another one (\"\" picks the first of %s that exists)", strings.Join(DefaultQEMUUsers, ", ")))
	}
	return "", 0, 0, errdefs.New(errdefs.ErrFailedPrecondition, "none of the users %s exists to run QEMU as", strings.Join(DefaultQEMUUsers, ", ")).
		With(advise("create one (useradd --system --no-create-home qemu), or set qemu_user in the VM's vm.json"))
}

// QEMUCredential is what QEMU is started with: nil when this process is
// not root, else the QEMU user with its group and, under KVM, the group
// that may open the KVM device.
func QEMUCredential(configured, accel string) (*syscall.Credential, error) {
	name, uid, gid, err := QEMUUser(configured)
	if err != nil || name == "" {
		return nil, err
	}
	groups := []uint32{uint32(gid)}
	if accel == "kvm" {
		if st, err := os.Stat(KVMDevice); err == nil {
			groups = append(groups, st.Sys().(*syscall.Stat_t).Gid)
		}
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: groups}, nil
}

// QEMUConfinementCheck reports how VMs' QEMU is confined here: as which
// user, and whether QEMU accepts its seccomp sandbox, tried by running QEMU
// with it as that user.
func QEMUConfinementCheck(ctx context.Context) Check {
	const name = "qemu confinement"
	exe, err := exec.LookPath(QEMU)
	if err != nil {
		return missing(name, QEMU+" is not installed", advise("apt install qemu-system-x86 (QEMU ≥ 7.2)"))
	}
	who, _, _, err := QEMUUser("")
	if err != nil {
		return missing(name, err.Error(), errdefs.Remedies(err)...)
	}
	cred, _ := QEMUCredential("", "tcg")
	if err := probeSandbox(ctx, exe, cred); err != nil {
		return missing(name, fmt.Sprintf("QEMU refuses -sandbox %s: %v", QEMUSandbox, err),
			advise("install a QEMU built with seccomp support (Debian: qemu-system-x86)"))
	}
	if who == "" {
		return ok(name, fmt.Sprintf("QEMU runs as this user (uid %d) under its seccomp sandbox (-sandbox %s)", os.Geteuid(), QEMUSandbox))
	}
	return ok(name, fmt.Sprintf("vm start (as root) runs QEMU as %s (uid %d) under its seccomp sandbox (-sandbox %s); it gets the VM's files as descriptors",
		who, cred.Uid, QEMUSandbox))
}

// probeSandbox runs QEMU with the sandbox, a machine that never starts and
// its monitor on stdio, and makes it quit.
func probeSandbox(ctx context.Context, exe string, cred *syscall.Credential) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe, "-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "none", "-S", "-sandbox", QEMUSandbox, "-qmp", "stdio")
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	cmd.Stdin = strings.NewReader(`{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"quit"}` + "\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return errors.New(lastLine(msg))
		}
		return err
	}
	return nil
}
