package qemutest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/hostcheck"
	"vtpm/internal/qmp"
	"vtpm/internal/testutil"
)

// Event is an asynchronous QMP event.
type Event = qmp.Event

// Config describes one QEMU guest.
type Config struct {
	// TPMSocket is the swtpm-compatible control socket. Empty means no TPM.
	TPMSocket string
	// TPMDevice is the QEMU frontend: "tpm-crb" (default) or "tpm-tis".
	TPMDevice string
	// SecureBoot selects the Secure Boot firmware with Microsoft keys and
	// an SMM-enabled machine.
	SecureBoot bool
	// VarsFile is a UEFI variable store to use (and keep) across restarts.
	// It is created from the firmware's template when it does not exist.
	// Empty means a fresh copy per VM.
	VarsFile string
	// Incoming, e.g. "unix:/path/mig.sock", starts QEMU waiting for an
	// incoming migration; Start then does not wait for the guest to boot.
	Incoming string
	// Memory is the guest RAM size in QEMU syntax; default "512M".
	Memory string
	// Image overrides the guest image; default BuildImage.
	Image *Image
	// Name labels log files and log lines; default "vm".
	Name string
	// ExtraArgs are appended to QEMU's command line.
	ExtraArgs []string
	// BootTimeout bounds the wait for the guest's command loop; default
	// 3 minutes. The context passed to Start also bounds it.
	BootTimeout time.Duration
}

// VM is a running QEMU process with its serial command channel and QMP.
type VM struct {
	cfg      Config
	dir      string // sockets, vars copy
	logDir   string // serial and QEMU logs
	varsFile string
	log      *slog.Logger

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error

	qmp    *qmp.Conn
	serial *serialConn

	stopOnce sync.Once
	stopErr  error

	// BootTime is how long Start took from launching QEMU until the guest
	// was ready for commands (zero for an incoming VM).
	BootTime time.Duration
}

// KVMAvailable reports whether QEMU can run guests under KVM here: the
// host's one probe (hostcheck.KVMUsable), which runs firmware under KVM
// once per process. VTPM_TEST_ACCEL=tcg or =kvm overrides the probe.
func KVMAvailable() bool {
	switch os.Getenv("VTPM_TEST_ACCEL") {
	case "tcg":
		return false
	case "kvm":
		return true
	}
	usable := hostcheck.KVMUsable()
	slog.Debug("kvm probe", "usable", usable == nil, "why", usable)
	return usable == nil
}

// SkipIfUnavailable skips t when QEMU or the OVMF firmware is missing.
func SkipIfUnavailable(t testing.TB) {
	t.Helper()
	if err := hostcheck.QEMUUsable(); err != nil {
		testutil.Missing(t, "%v; skipping VM test", err)
	}
	code, vars := hostcheck.Firmware(false)
	for _, f := range hostcheck.MissingFirmware(code, vars) {
		testutil.Missing(t, "OVMF firmware %s not installed; skipping VM test", f)
	}
	if testing.Short() {
		t.Skip("VM test skipped in -short mode")
	}
}

// ShortTempDir returns a temporary directory whose path is short enough for
// unix sockets (t.TempDir's often is not); it is removed at cleanup.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "qt")
	if err != nil {
		t.Fatalf("create temp dir: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Start launches QEMU and, unless cfg.Incoming is set, waits until the
// guest runs its command loop. ctx bounds only the start-up; the VM lives
// until Stop or the end of the test.
func Start(ctx context.Context, t testing.TB, cfg Config) (*VM, error) {
	t.Helper()
	if cfg.TPMDevice == "" {
		cfg.TPMDevice = "tpm-crb"
	}
	if cfg.Memory == "" {
		cfg.Memory = "512M"
	}
	if cfg.Name == "" {
		cfg.Name = "vm"
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = 3 * time.Minute
	}
	img := cfg.Image
	if img == nil {
		var err error
		if img, err = BuildImage(ctx); err != nil {
			return nil, fmt.Errorf("guest image: %w", err)
		}
	}

	vm := &VM{
		cfg:    cfg,
		dir:    ShortTempDir(t),
		logDir: t.TempDir(),
		exited: make(chan struct{}),
		log:    slog.Default().With("vm", cfg.Name),
	}
	if err := vm.prepareVars(); err != nil {
		return nil, err
	}

	serialSock := filepath.Join(vm.dir, "serial.sock")
	qmpSock := filepath.Join(vm.dir, "qmp.sock")
	// QEMU connects to us, so no boot output is lost and there is no
	// race waiting for QEMU's sockets to appear.
	serialL, err := net.Listen("unix", serialSock)
	if err != nil {
		return nil, fmt.Errorf("listen for serial console: %w", err)
	}
	defer serialL.Close()
	qmpL, err := net.Listen("unix", qmpSock)
	if err != nil {
		return nil, fmt.Errorf("listen for qmp: %w", err)
	}
	defer qmpL.Close()

	args := vm.qemuArgs(img, serialSock, qmpSock)
	qemuLog, err := os.Create(filepath.Join(vm.logDir, cfg.Name+"-qemu.log"))
	if err != nil {
		return nil, fmt.Errorf("create qemu log: %w", err)
	}
	serialLog, err := os.Create(filepath.Join(vm.logDir, cfg.Name+"-serial.log"))
	if err != nil {
		qemuLog.Close()
		return nil, fmt.Errorf("create serial log: %w", err)
	}
	fmt.Fprintf(qemuLog, "+ %s %s\n", hostcheck.QEMU, strings.Join(args, " "))

	vm.cmd = exec.Command(hostcheck.QEMU, args...)
	vm.cmd.Stdout = qemuLog
	vm.cmd.Stderr = qemuLog
	began := time.Now()
	if err := vm.cmd.Start(); err != nil {
		qemuLog.Close()
		serialLog.Close()
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	vm.log.Debug("qemu started", "pid", vm.cmd.Process.Pid, "args", args)
	go func() {
		vm.waitErr = vm.cmd.Wait()
		qemuLog.Close()
		close(vm.exited)
	}()
	t.Cleanup(func() {
		// Stop first so the logs are complete when we show them.
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := vm.Stop(sctx); err != nil {
			t.Logf("%s: stop: %v", cfg.Name, err)
		}
		serialLog.Close()
		if t.Failed() {
			t.Logf("%s: QEMU log tail:\n%s", cfg.Name, vm.tail(qemuLog.Name(), 30))
			t.Logf("%s: serial console tail (%s):\n%s", cfg.Name, serialLog.Name(), vm.tail(serialLog.Name(), 60))
		}
	})

	fail := func(err error) (*VM, error) {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = vm.Stop(sctx)
		return nil, fmt.Errorf("%s: %w\nqemu log:\n%s", cfg.Name, err, vm.tail(qemuLog.Name(), 20))
	}

	sconn, err := vm.accept(ctx, serialL, "serial console")
	if err != nil {
		return fail(err)
	}
	vm.serial = newSerial(sconn, serialLog)
	qconn, err := vm.accept(ctx, qmpL, "qmp")
	if err != nil {
		return fail(err)
	}
	q, err := qmp.New(ctx, qconn, vm.log)
	if err != nil {
		qconn.Close()
		return fail(err)
	}
	vm.qmp = q
	if cfg.Incoming != "" {
		return vm, nil
	}

	bctx, cancel := context.WithTimeout(ctx, cfg.BootTimeout)
	defer cancel()
	// A guest that stops while booting (e.g. a KVM emulation failure puts
	// QEMU in internal-error) would otherwise only show up as a timeout.
	abort := make(chan struct{})
	go func() {
		defer close(abort)
		select {
		case <-vm.exited:
		case <-bctx.Done():
		default:
			if ev, _, err := q.WaitEvent(bctx, "STOP", 0); err == nil {
				vm.log.Warn("guest stopped during boot", "event", ev.Name)
			}
		}
	}()
	if err := vm.serial.waitReady(bctx, abort); err != nil {
		if st, serr := vm.Status(ctx); serr == nil && st != "running" {
			err = fmt.Errorf("%w (qemu status %q)", err, st)
		}
		return fail(err)
	}
	vm.BootTime = time.Since(began)
	t.Logf("%s: guest ready after %v (accel %s)", cfg.Name, vm.BootTime.Round(10*time.Millisecond), accelName())
	return vm, nil
}

func accelName() string {
	if KVMAvailable() {
		return "kvm"
	}
	return "tcg"
}

func (vm *VM) prepareVars() error {
	_, template := hostcheck.Firmware(vm.cfg.SecureBoot)
	vm.varsFile = vm.cfg.VarsFile
	if vm.varsFile == "" {
		vm.varsFile = filepath.Join(vm.dir, "vars.fd")
	} else if _, err := os.Stat(vm.varsFile); err == nil {
		return nil
	}
	data, err := os.ReadFile(template)
	if err != nil {
		return fmt.Errorf("read OVMF vars template: %w", err)
	}
	if err := os.WriteFile(vm.varsFile, data, 0o600); err != nil {
		return fmt.Errorf("create UEFI vars file: %w", err)
	}
	return nil
}

func (vm *VM) qemuArgs(img *Image, serialSock, qmpSock string) []string {
	code, _ := hostcheck.Firmware(vm.cfg.SecureBoot)
	machine := "q35"
	if vm.cfg.SecureBoot {
		machine = "q35,smm=on"
	}
	accel := []string{"-accel", "tcg"}
	if KVMAvailable() {
		accel = []string{"-accel", "kvm", "-cpu", "host"}
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none",
		"-machine", machine,
	}
	args = append(args, accel...)
	args = append(args,
		"-m", vm.cfg.Memory, "-smp", "1",
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+code,
		"-drive", "if=pflash,format=raw,unit=1,file="+vm.varsFile,
	)
	if vm.cfg.SecureBoot {
		args = append(args, "-global", "driver=cfi.pflash01,property=secure,value=on")
	}
	args = append(args,
		"-kernel", img.Kernel,
		"-initrd", img.Initrd,
		"-append", "console=ttyS0 quiet rdinit=/init no_timer_check", // the IO-APIC timer check fails under TCG on a busy host
		"-chardev", "socket,id=ser0,path="+serialSock,
		"-serial", "chardev:ser0",
		"-chardev", "socket,id=qmp0,path="+qmpSock,
		"-mon", "chardev=qmp0,mode=control",
	)
	if vm.cfg.TPMSocket != "" {
		args = append(args,
			"-chardev", "socket,id=chrtpm,path="+vm.cfg.TPMSocket,
			"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
			"-device", vm.cfg.TPMDevice+",tpmdev=tpm0",
		)
	}
	if vm.cfg.Incoming != "" {
		args = append(args, "-incoming", vm.cfg.Incoming)
	}
	return append(args, vm.cfg.ExtraArgs...)
}

// accept waits for QEMU to connect to l, giving up if QEMU exits.
func (vm *VM) accept(ctx context.Context, l net.Listener, what string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("accept %s connection: %w", what, r.err)
		}
		return r.c, nil
	case <-vm.exited:
		return nil, fmt.Errorf("qemu exited before connecting its %s: %v", what, vm.waitErr)
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for qemu's %s connection: %w", what, ctx.Err())
	}
}

// Run runs a shell command in the guest and returns its combined output.
// A non-zero exit status gives a *CommandError that carries the output.
func (vm *VM) Run(ctx context.Context, command string) (string, error) {
	if vm.serial == nil {
		return "", errors.New("run: no serial console")
	}
	out, err := vm.serial.run(ctx, vm.exited, command)
	if err != nil {
		return out, fmt.Errorf("%s: %w", vm.cfg.Name, err)
	}
	return out, nil
}

// QMP executes a QMP command; args is marshalled as its "arguments".
func (vm *VM) QMP(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	if vm.qmp == nil {
		return nil, errors.New("qmp: not connected")
	}
	return vm.qmp.Execute(ctx, cmd, args)
}

// WaitEvent waits for a QMP event with the given name, including events
// that arrived before the call.
func (vm *VM) WaitEvent(ctx context.Context, name string) (Event, error) {
	if vm.qmp == nil {
		return Event{}, errors.New("qmp: not connected")
	}
	ev, _, err := vm.qmp.WaitEvent(ctx, name, 0)
	return ev, err
}

// Status returns query-status's "status", e.g. "running", "inmigrate",
// "postmigrate", "paused".
func (vm *VM) Status(ctx context.Context) (string, error) {
	if vm.qmp == nil {
		return "", errors.New("qmp: not connected")
	}
	return vm.qmp.Status(ctx)
}

// WaitStatus polls query-status until it reports want.
func (vm *VM) WaitStatus(ctx context.Context, want string) error {
	for {
		st, err := vm.Status(ctx)
		if err != nil {
			return err
		}
		if st == want {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: wait for status %q (last %q): %w", vm.cfg.Name, want, st, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Migrate migrates this VM to uri (the destination's Incoming) and waits
// until QEMU reports the migration completed or failed.
func (vm *VM) Migrate(ctx context.Context, uri string) error {
	if vm.qmp == nil {
		return errors.New("qmp: not connected")
	}
	if err := vm.qmp.Migrate(ctx, uri); err != nil {
		return fmt.Errorf("%s: start migration: %w", vm.cfg.Name, err)
	}
	for {
		st, err := vm.qmp.QueryMigrate(ctx)
		if err != nil {
			return fmt.Errorf("%s: migration: %w", vm.cfg.Name, err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("%s: migration %s: %s", vm.cfg.Name, st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: migration (status %q): %w", vm.cfg.Name, st.Status, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop shuts QEMU down: "quit" over QMP, then SIGKILL if it lingers or ctx
// ends. The process is always reaped. Calling it again is harmless.
func (vm *VM) Stop(ctx context.Context) error {
	vm.stopOnce.Do(func() {
		vm.stopErr = vm.stop(ctx)
		if vm.qmp != nil {
			vm.qmp.Close()
		}
		if vm.serial != nil {
			vm.serial.conn.Close()
		}
	})
	return vm.stopErr
}

func (vm *VM) stop(ctx context.Context) error {
	select {
	case <-vm.exited:
		return nil
	default:
	}
	if vm.qmp == nil {
		// Start failed before QMP was up; nothing to be graceful with.
		_ = vm.cmd.Process.Signal(syscall.SIGKILL)
		<-vm.exited
		return nil
	}
	{
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := vm.qmp.Quit(qctx)
		cancel()
		if err != nil {
			vm.log.Debug("qmp quit failed", "err", err)
		}
		select {
		case <-vm.exited:
			return nil
		case <-time.After(10 * time.Second):
		case <-ctx.Done():
		}
	}
	if err := vm.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		vm.log.Warn("kill qemu", "err", err)
	}
	<-vm.exited
	return fmt.Errorf("%s: qemu did not quit, killed it", vm.cfg.Name)
}

// Wait waits for QEMU to exit by itself and returns its exit error.
func (vm *VM) Wait(ctx context.Context) error {
	select {
	case <-vm.exited:
		return vm.waitErr
	case <-ctx.Done():
		return fmt.Errorf("%s: wait for qemu: %w", vm.cfg.Name, ctx.Err())
	}
}

// Exited is closed when the QEMU process has been reaped.
func (vm *VM) Exited() <-chan struct{} { return vm.exited }

// VarsFile is the UEFI variable store this VM uses.
func (vm *VM) VarsFile() string { return vm.varsFile }

// SerialLog is the path of the full serial console log.
func (vm *VM) SerialLog() string { return filepath.Join(vm.logDir, vm.cfg.Name+"-serial.log") }

// tail returns the last n lines of a file, for failure reports.
func (vm *VM) tail(name string, n int) string {
	f, err := os.Open(name)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	defer f.Close()
	data, err := io.ReadAll(f)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	data = bytes.ReplaceAll(data, []byte("\r"), nil)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
