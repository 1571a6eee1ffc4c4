package hostcheck

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// QEMU is the emulator binary VMs and tests run.
var QEMU = "qemu-system-x86_64"

// QEMU versions vtpm needs (-tpmdev emulator with migration of its state).
const (
	qemuMajor = 7
	qemuMinor = 2
)

// FindQEMU returns the emulator's path, or an error saying how to install it.
func FindQEMU() (string, error) {
	p, err := exec.LookPath(QEMU)
	if err != nil {
		return "", fmt.Errorf("%s is not installed (apt-get install qemu-system-x86)", QEMU)
	}
	return p, nil
}

// Compiled on first use, not at every vTPM start.
var (
	qemuVersionRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`version (\d+)\.(\d+)`) })
	tpmEmulatorRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`(?m)^\s*emulator\s`) })
)

// parseQEMUVersion reads `qemu --version`'s major and minor.
func parseQEMUVersion(out []byte) (major, minor int, ok bool) {
	m := qemuVersionRE().FindSubmatch(out)
	if m == nil {
		return 0, 0, false
	}
	major, _ = strconv.Atoi(string(m[1]))
	minor, _ = strconv.Atoi(string(m[2]))
	return major, minor, true
}

// qemuVersion runs exe --version.
func qemuVersion(ctx context.Context, exe string) (major, minor int, err error) {
	out, err := exec.CommandContext(ctx, exe, "--version").Output()
	major, minor, found := parseQEMUVersion(out)
	if err != nil || !found {
		return 0, 0, fmt.Errorf("%s --version: %v %q", exe, err, firstLine(out))
	}
	return major, minor, nil
}

func newEnough(major, minor int) bool {
	return major > qemuMajor || major == qemuMajor && minor >= qemuMinor
}

// tpmEmulator reports whether exe has the TPM emulator backend.
func tpmEmulator(ctx context.Context, exe string) error {
	// QEMU 7.2 lists the backends and exits 1: the list is what counts.
	out, _ := exec.CommandContext(ctx, exe, "-tpmdev", "help").CombinedOutput()
	if !tpmEmulatorRE().Match(out) {
		return fmt.Errorf("-tpmdev help does not list emulator: %q", strings.TrimSpace(string(out)))
	}
	return nil
}

var (
	qemuOnce          sync.Once
	qemuErr, tpmdvErr error
)

// probeQEMU finds QEMU, its version and its TPM backend, once per process.
func probeQEMU() {
	qemuOnce.Do(func() {
		exe, err := FindQEMU()
		if err != nil {
			qemuErr, tpmdvErr = err, err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		major, minor, err := qemuVersion(ctx, exe)
		switch {
		case err != nil:
			qemuErr = err
		case !newEnough(major, minor):
			qemuErr = fmt.Errorf("%s is QEMU %d.%d; vtpm needs 7.2 or newer", exe, major, minor)
		}
		if err := tpmEmulator(ctx, exe); err != nil {
			tpmdvErr = fmt.Errorf("%s has no TPM emulator backend (install a QEMU built with TPM support): %w", exe, err)
		}
	})
}

// QEMUUsable reports whether QEMU is installed and new enough (≥ 7.2).
func QEMUUsable() error {
	probeQEMU()
	return qemuErr
}

// TPMEmulatorUsable reports whether QEMU can attach a vTPM (-tpmdev
// emulator).
func TPMEmulatorUsable() error {
	probeQEMU()
	return tpmdvErr
}

// QEMUChecks reports the emulator, its version and its TPM emulator backend.
func QEMUChecks(ctx context.Context) []Check {
	const name = "qemu"
	exe, err := exec.LookPath(QEMU)
	if err != nil {
		return []Check{missing(name, QEMU+" is not installed", advise("apt install qemu-system-x86 (QEMU ≥ 7.2)"))}
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	major, minor, err := qemuVersion(ctx, exe)
	if err != nil {
		return []Check{missing(name, err.Error(), advise("reinstall QEMU (≥ 7.2)"))}
	}
	cs := []Check{ok(name, fmt.Sprintf("%s %d.%d", exe, major, minor))}
	if !newEnough(major, minor) {
		cs[0] = missing(name, fmt.Sprintf("%s is QEMU %d.%d", exe, major, minor), advise("upgrade QEMU to 7.2 or newer"))
	}
	const tname = "qemu tpm-emulator"
	if err := tpmEmulator(ctx, exe); err != nil {
		cs = append(cs, missing(tname, err.Error(), advise("install a QEMU built with TPM support (Debian: qemu-system-x86)")))
	} else {
		cs = append(cs, ok(tname, "-tpmdev emulator supported"))
	}
	return cs
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(string(b), "\n")
	return s
}
