package hostcheck

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// KVMDevice is KVM's device node.
var KVMDevice = "/dev/kvm"

// kvmGetAPIVersion is KVM_GET_API_VERSION, _IO(0xAE, 0x00).
const kvmGetAPIVersion = 0xAE00

// kvmAPIVersion is the stable API's version.
const kvmAPIVersion = 12

// kvmDevice opens KVM's device and asks its API version.
func kvmDevice() error {
	f, err := os.OpenFile(KVMDevice, os.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	if err != nil || v != kvmAPIVersion {
		return &apiVersionError{v, err}
	}
	return nil
}

type apiVersionError struct {
	version int
	err     error
}

func (e *apiVersionError) Error() string {
	return fmt.Sprintf("KVM_GET_API_VERSION = %d, %v (want %d)", e.version, e.err, kvmAPIVersion)
}

// kvm is the process's KVM verdict.
var kvm struct {
	sync.Mutex
	known bool
	err   error
}

// KVMUsable reports whether QEMU can run guests under KVM here, and if not,
// why. A /dev/kvm that opens is not enough: nested setups may accept the
// device and then abort on the first register writes or instructions (an
// MSR QEMU cannot set), so QEMU runs firmware under KVM for a moment and
// must still be running. That takes seconds, so its verdict is kept for
// the process and, in the runtime directory, for the rest of the boot
// (kvmcache.go); the device itself is checked every time.
func KVMUsable() error { return kvmUsable(false) }

// kvmUsable answers from the process's verdict, else the boot's, else
// probes; fresh always probes and refreshes both.
func kvmUsable(fresh bool) error {
	kvm.Lock()
	defer kvm.Unlock()
	if fresh || !kvm.known {
		kvm.err, kvm.known = checkKVM(fresh), true
	}
	return kvm.err
}

func checkKVM(fresh bool) error {
	if err := kvmDevice(); err != nil {
		return err
	}
	exe, err := exec.LookPath(QEMU)
	if err != nil {
		return fmt.Errorf("%s is not installed to try KVM with", QEMU)
	}
	return cachedKVMProbe(exe, fresh)
}

// kvmProbeRun is how long the probe lets the firmware run.
const kvmProbeRun = 2 * time.Second

// kvmRefusal is the probe's verdict that QEMU cannot run a guest under KVM
// here. Other probe errors (QEMU did not start, or did not answer in time)
// say nothing lasting about the host.
type kvmRefusal struct{ why string }

func (e *kvmRefusal) Error() string { return "QEMU cannot run a guest under KVM: " + e.why }

// probeKVM runs firmware under KVM in exe for kvmProbeRun.
func probeKVM(exe string) error {
	const timeout = 20 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	args := []string{"-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "128M", "-qmp", "stdio"}
	// OVMF when it is there; else QEMU's own BIOS runs.
	if code, _ := Firmware(false); exists(code) {
		args = append(args, "-drive", "if=pflash,format=raw,unit=0,readonly=on,snapshot=on,file="+code)
	}
	cmd := exec.CommandContext(ctx, exe, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("run %s: %w", exe, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	// Let the firmware run long enough to hit any emulation failure; a QEMU
	// that exits before then has failed already, so it is not waited for.
	select {
	case <-exited:
	case <-time.After(kvmProbeRun):
		_, _ = io.WriteString(stdin, `{"execute":"qmp_capabilities"}`+"\n"+`{"execute":"query-status"}`+"\n"+`{"execute":"quit"}`+"\n")
		<-exited
	}
	if strings.Contains(out.String(), `"status": "running"`) {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("%s did not answer within %v while trying KVM", exe, timeout)
	}
	why := strings.TrimSpace(stderr.String())
	if why == "" {
		why = "the guest did not keep running"
	}
	return &kvmRefusal{lastLine(why)}
}

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// Accel returns the accelerator a VM started with requested ("", "kvm" or
// "tcg") uses: requested, else $VTPM_ACCEL, else KVM when QEMU can use it,
// else TCG.
func Accel(requested string) (string, error) {
	if requested == "" {
		requested = os.Getenv("VTPM_ACCEL")
	}
	switch requested {
	case "kvm", "tcg":
		return requested, nil
	case "":
		if KVMUsable() == nil {
			return "kvm", nil
		}
		return "tcg", nil
	}
	return "", fmt.Errorf("accelerator %q: want kvm or tcg", requested)
}

// KVMCheck reports whether VMs run under KVM here.
func KVMCheck() Check {
	const name = "kvm"
	if err := kvmDevice(); err != nil {
		var v *apiVersionError
		switch {
		case errors.As(err, &v):
			return missing(name, err.Error(), advise("use a kernel whose KVM has the stable API (Linux ≥ 2.6.22)"))
		case errors.Is(err, fs.ErrPermission):
			return missing(name, err.Error(), advise("add this user to the kvm group (usermod -aG kvm USER) and log in again"))
		}
		return missing(name, err.Error(), advise("enable virtualisation (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd"))
	}
	if _, err := exec.LookPath(QEMU); err != nil {
		return ok(name, fmt.Sprintf("%s usable, API version %d (QEMU is not installed to try it)", KVMDevice, kvmAPIVersion))
	}
	// Doctor tries again rather than trust an earlier verdict.
	if err := kvmUsable(true); err != nil {
		return missing(name, fmt.Sprintf("%s opens, but %v; VMs run under TCG (slow)", KVMDevice, err),
			advise("on a nested host, enable nested virtualisation in the outer hypervisor and give this VM the host's CPU model; or set VTPM_ACCEL=tcg"))
	}
	return ok(name, fmt.Sprintf("%s usable, API version %d; QEMU runs guests under KVM", KVMDevice, kvmAPIVersion))
}
