package hostcheck

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
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

var (
	qemuVersionRE = regexp.MustCompile(`version (\d+)\.(\d+)`)
	tpmEmulatorRE = regexp.MustCompile(`(?m)^\s*emulator\s`)
)

// parseQEMUVersion reads `qemu --version`'s major and minor.
func parseQEMUVersion(out []byte) (major, minor int, ok bool) {
	m := qemuVersionRE.FindSubmatch(out)
	if m == nil {
		return 0, 0, false
	}
	major, _ = strconv.Atoi(string(m[1]))
	minor, _ = strconv.Atoi(string(m[2]))
	return major, minor, true
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
	out, err := exec.CommandContext(ctx, exe, "--version").Output()
	major, minor, found := parseQEMUVersion(out)
	if err != nil || !found {
		return []Check{missing(name, fmt.Sprintf("%s --version: %v %q", exe, err, firstLine(out)), advise("reinstall QEMU (≥ 7.2)"))}
	}
	cs := []Check{ok(name, fmt.Sprintf("%s %d.%d", exe, major, minor))}
	if major < qemuMajor || major == qemuMajor && minor < qemuMinor {
		cs[0] = missing(name, fmt.Sprintf("%s is QEMU %d.%d", exe, major, minor), advise("upgrade QEMU to 7.2 or newer"))
	}
	cs = append(cs, tpmEmulatorCheck(ctx, exe))
	return cs
}

func tpmEmulatorCheck(ctx context.Context, exe string) Check {
	const name = "qemu tpm-emulator"
	// QEMU 7.2 lists the backends and exits 1: the list is what counts.
	out, _ := exec.CommandContext(ctx, exe, "-tpmdev", "help").CombinedOutput()
	if !tpmEmulatorRE.Match(out) {
		return missing(name, fmt.Sprintf("-tpmdev help does not list emulator: %q", strings.TrimSpace(string(out))),
			advise("install a QEMU built with TPM support (Debian: qemu-system-x86)"))
	}
	return ok(name, "-tpmdev emulator supported")
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(string(b), "\n")
	return s
}
