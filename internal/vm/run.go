package vm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/hostcheck"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/sandbox"
	"vtpm/internal/state"
)

// runPaths are a VM's run-time files. They live outside the bundle, so a
// copied bundle never carries another VM's pids or sockets, and in a short
// directory, as unix socket paths are limited to 108 bytes.
//
// The vTPM's socket and pid file have a directory of their own, which a
// vTPM running as an unprivileged user owns (it writes its pid file and
// removes both after dropping privileges); QEMU's files stay root's.
type runPaths struct {
	Dir, QMP, QEMUPid       string
	TPMRun, TPMSock, TPMPid string
}

func runBase() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "vtpm")
	}
	if os.Geteuid() == 0 {
		return "/run/vtpm"
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("vtpm-%d", os.Getuid()))
}

func (h *Registry) runDir(v *VM) string {
	sum := sha256.Sum256([]byte(v.Dir))
	return filepath.Join(runBase(), hex.EncodeToString(sum[:8]))
}

func (h *Registry) run(v *VM) runPaths {
	d := h.runDir(v)
	t := filepath.Join(d, "tpm")
	return runPaths{Dir: d, QMP: filepath.Join(d, "qmp.sock"), QEMUPid: filepath.Join(d, "qemu.pid"),
		TPMRun: t, TPMSock: filepath.Join(t, "tpm.sock"), TPMPid: filepath.Join(t, "tpm.pid")}
}

// RunState is what is running for a VM.
type RunState struct {
	QEMU int // pid, 0 if not running
	TPM  int // pid of the vTPM instance, 0 if not running
}

// Running reports whether the VM's QEMU runs.
func (s RunState) Running() bool { return s.QEMU != 0 }

// String is the state as `vm list` shows it.
func (s RunState) String() string {
	switch {
	case s.QEMU != 0:
		return "running"
	case s.TPM != 0:
		return "tpm-only"
	}
	return "stopped"
}

// State derives a VM's run state from its live processes: a pid counts
// only while /proc shows that process using the VM's run directory, so
// stale pid files and reused pids do not.
func (h *Registry) State(v *VM) RunState {
	r := h.run(v)
	// QEMU's command line names the run directory's name (its monitor's
	// id), not its path: its descriptors come from vm start.
	return RunState{QEMU: livePid(r.QEMUPid, filepath.Base(r.Dir)), TPM: livePid(r.TPMPid, r.Dir)}
}

func livePid(pidFile, mark string) int {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmdline, []byte(mark)) {
		return 0
	}
	return pid
}

func (h *Registry) requireStopped(v *VM, what string) error {
	if st := h.State(v); st.Running() || st.TPM != 0 {
		return precondition([]errdefs.Remedy{do(errdefs.ActionVMStop, "vm", v.Name())}, "VM %s is running; stop it to %s", v.Name(), what)
	}
	return nil
}

// StartOptions control how a VM starts.
type StartOptions struct {
	// Console runs QEMU in the foreground with the serial console on
	// Stdin/Stdout; Start returns when the VM stops.
	Console        bool
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// SerialSocket exposes the serial console on a unix socket (QEMU is the
	// server; a client may connect at any time).
	SerialSocket string
	// Accel is "kvm", "tcg" or "" ($VTPM_ACCEL, else KVM when QEMU can
	// use it, else TCG: hostcheck.Accel).
	Accel string

	// incoming starts QEMU paused, waiting for a migration (-incoming
	// defer -S), on machine type machine (the source's, resolved).
	incoming bool
	machine  string
}

// PreflightError lists every reason a VM cannot start; nothing was started.
// It matches errdefs.ErrFailedPrecondition, and its remedies are those of
// all its problems.
type PreflightError struct {
	VM       string
	Problems []error
}

func (e *PreflightError) Error() string {
	return listProblems(fmt.Sprintf("VM %s cannot start (nothing was started):", e.VM), e.Problems)
}

// listProblems is head followed by one indented item per problem.
func listProblems(head string, problems []error) string {
	var b strings.Builder
	b.WriteString(head)
	for _, p := range problems {
		b.WriteString("\n  - ")
		b.WriteString(strings.ReplaceAll(p.Error(), "\n", "\n    "))
	}
	return b.String()
}

func (e *PreflightError) Unwrap() []error { return e.Problems }

// Is matches errdefs.ErrFailedPrecondition.
func (e *PreflightError) Is(target error) bool { return target == errdefs.ErrFailedPrecondition }

// Remedies are the union of the problems' remedies.
func (e *PreflightError) Remedies() []errdefs.Remedy {
	var out []errdefs.Remedy
	for _, p := range e.Problems {
		for _, r := range errdefs.Remedies(p) {
			if !slices.ContainsFunc(out, r.Equal) {
				out = append(out, r)
			}
		}
	}
	return out
}

// isolationProblems says what the host lacks for an isolated vTPM process
// (the instance itself refuses to start without every part).
func isolationProblems(vm string) []error {
	fix := []errdefs.Remedy{
		do(errdefs.ActionDoctor).WithNote("the host's state"),
		do(errdefs.ActionIsolationPreferred, "vm", vm).WithNote("or relax the VM's policy"),
	}
	var probs []error
	if _, err := sandbox.LandlockABI(); err != nil {
		probs = append(probs, precondition(fix, "the VM's policy requires an isolated vTPM process, and Landlock is missing: %v", err))
	}
	if err := sandbox.SeccompAvailable(); err != nil {
		probs = append(probs, precondition(fix, "the VM's policy requires an isolated vTPM process, and seccomp is missing: %v", err))
	}
	return probs
}

// Preflight checks everything a start needs, without starting anything:
// the emulator, firmware files, variable store, kernel, disks, the TPM's
// key (a guardian error here means this host may not open the TPM) and the
// isolation the VM's policy requires.
func (h *Registry) Preflight(v *VM) error {
	c := v.Config
	var probs []error
	add := func(format string, a ...any) { probs = append(probs, fmt.Errorf(format, a...)) }
	if c.Template {
		return &PreflightError{VM: c.Name, Problems: []error{precondition([]errdefs.Remedy{do(errdefs.ActionVMDeploy, "template", c.Name)},
			"%s is a template and never runs; make a VM from it", c.Name)}}
	}
	if err := hostcheck.QEMUUsable(); err != nil {
		probs = append(probs, err)
	} else if c.TPMEnabled() {
		if err := hostcheck.TPMEmulatorUsable(); err != nil {
			probs = append(probs, err)
		}
	}
	if c.Firmware == UEFI {
		code, tmpl := firmwareFiles(c)
		if _, err := os.Stat(code); err != nil {
			add("UEFI firmware %s is missing (apt-get install ovmf): %v", code, err)
		}
		if _, err := os.Stat(filepath.Join(v.Dir, VarsFile)); err != nil {
			add("the VM's UEFI variable store is missing: %v; restore it from a backup, or start over with a blank one: `cp %s %s`", err, tmpl, filepath.Join(v.Dir, VarsFile))
		}
	}
	for _, f := range []struct{ what, path string }{{"kernel", v.File(c.Kernel)}, {"initrd", v.File(c.Initrd)}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			add("the %s for direct boot is missing: %v", f.what, err)
		}
	}
	probs = append(probs, qemuAccessProblems(v)...)
	for _, d := range c.Disks {
		p := d.Path
		if !filepath.IsAbs(p) {
			p = filepath.Join(v.Dir, p)
		}
		if f, err := os.OpenFile(p, os.O_RDWR, 0); err != nil {
			add("disk %s cannot be opened for writing: %v", p, err)
		} else {
			f.Close()
		}
	}
	if c.TPMEnabled() {
		if err := CanHaveTPM(c); err != nil {
			probs = append(probs, err)
		} else if err := h.checkTPMKey(v); err != nil {
			probs = append(probs, err)
		}
		if c.IsolationPolicy() == sandbox.Required {
			probs = append(probs, isolationProblems(c.Name)...)
		}
	}
	if len(probs) > 0 {
		return &PreflightError{VM: c.Name, Problems: probs}
	}
	return nil
}

func (h *Registry) checkTPMKey(v *VM) error {
	dir := v.TPMDir()
	switch {
	case state.IsSealed(dir):
	case state.IsSwtpm(dir):
		return nil // swtpm's format: its key, if any, is an --key option
	default:
		return errdefs.New(errdefs.ErrDataLoss, "the TPM state of %s is missing from %s: restore it from a backup (under %s), or give the VM a new TPM",
			v.Name(), dir, h.BackupsDir()).
			With(do(errdefs.ActionTPMRemove, "vm", v.Name()), do(errdefs.ActionTPMAdd, "vm", v.Name()))
	}
	k, err := h.keys()
	if err != nil {
		return fmt.Errorf("open this host's keystore: %w", err)
	}
	defer k.Close()
	fleet := func(rows []guardian.Row) bool {
		_, ok := hostsvc.FleetRow(h.Root, rows)
		return ok
	}
	o, err := k.OpenTPMWith(dir, keybroker.OpenOptions{Releasable: fleet})
	var missing *keybroker.MissingKeyError
	if errors.As(err, &missing) {
		if fleet(missing.Rows) {
			// The vTPM will get the key from the key service through the
			// host service; asking for it here would release it twice.
			// The service must answer, though.
			if _, perr := (hostsvc.Client{}).Ping(); perr != nil {
				return &hostsvc.FleetError{Missing: missing, Service: perr}
			}
			return nil
		}
	}
	if err != nil {
		return err
	}
	o.Close()
	return nil
}

// qemuArgs is QEMU's command line for v; serial is the -chardev of the
// console ("ser0"), io how QEMU reaches files and sockets. Every value
// that lands in an option string is escaped (optEscape); vm.json's values
// were validated when it was read.
func qemuArgs(v *VM, r runPaths, accel, serial string, io qemuIO) ([]string, error) {
	c := v.Config
	machine := "q35"
	if c.SecureBoot {
		machine = "q35,smm=on"
	}
	mem, err := ParseMemory(c.Memory)
	if err != nil {
		return nil, err
	}
	args := []string{
		"-name", "guest=" + optEscape(c.Name), "-uuid", c.UUID.String(),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-machine", machine, "-accel", accel,
	}
	if accel == "kvm" {
		args = append(args, "-cpu", "host")
	}
	args = append(args, "-m", strconv.FormatInt(mem/MiB, 10)+"M", "-smp", strconv.Itoa(c.CPUs))
	if c.Firmware == UEFI {
		code, _ := firmwareFiles(c)
		vars, err := io.file(filepath.Join(v.Dir, VarsFile), true)
		if err != nil {
			return nil, fmt.Errorf("the UEFI variable store: %w", err)
		}
		args = append(args,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+optEscape(code),
			"-drive", "file.auto-read-only=off,if=pflash,format=raw,unit=1,file="+vars)
		if c.SecureBoot {
			args = append(args, "-global", "driver=cfi.pflash01,property=secure,value=on")
		}
	}
	if c.Kernel != "" {
		// Whole arguments, not option strings.
		args = append(args, "-kernel", v.File(c.Kernel))
		if c.Initrd != "" {
			args = append(args, "-initrd", v.File(c.Initrd))
		}
		args = append(args, "-append", strings.TrimSpace("console=ttyS0 "+c.Append))
	} else {
		args = append(args, "-vga", "std")
	}
	for i, d := range c.Disks {
		if !oneOf(d.Format, DiskFormats) {
			return nil, fmt.Errorf("disk %s: format %q", d.Path, d.Format)
		}
		p := d.Path
		if !filepath.IsAbs(p) {
			p = filepath.Join(v.Dir, p)
		}
		f, err := io.file(p, true)
		if err != nil {
			return nil, fmt.Errorf("disk %s: %w", p, err)
		}
		// Opened read-write at once: see fdIO.file.
		opt := fmt.Sprintf("file.auto-read-only=off,if=virtio,index=%d,format=%s,file=%s", i, d.Format, f)
		if d.Passthrough {
			opt += ",cache=none"
		}
		args = append(args, "-drive", opt)
	}
	nic := "virtio-net-pci"
	if c.OS.Windows() {
		nic = "e1000e"
	}
	qmp, err := io.socket(r.QMP, true)
	if err != nil {
		return nil, fmt.Errorf("QEMU's monitor socket: %w", err)
	}
	args = append(args, "-nic", "user,model="+nic)
	args = append(args,
		"-chardev", serial, "-serial", "chardev:ser0",
		"-chardev", "socket,id="+qemuMark(r)+","+qmp+",server=on,wait=off", "-mon", "chardev="+qemuMark(r)+",mode=control")
	if c.TPMEnabled() {
		dev := c.TPM.Device
		if dev == "" {
			dev = DefaultTPMDevice
		}
		if !oneOf(dev, TPMDevices) {
			return nil, fmt.Errorf("TPM device %q", dev)
		}
		tpm, err := io.socket(r.TPMSock, false)
		if err != nil {
			return nil, fmt.Errorf("the vTPM's control socket: %w", err)
		}
		args = append(args,
			"-chardev", "socket,id=chrtpm,"+tpm,
			"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
			"-device", dev+",tpmdev=tpm0")
	}
	args = append(args, "-sandbox", hostcheck.QEMUSandbox)
	return args, nil
}

// qemuMark is the id of a VM's monitor chardev: the run directory's name
// (hex digits) after a letter, as ids start with one. State finds that name
// in QEMU's command line to tell its pid file from a reused pid.
func qemuMark(r runPaths) string { return "vtpm-" + filepath.Base(r.Dir) }

// tpmArgs is the vTPM instance's command line (after the executable);
// runAs is the user it drops to, "" for none.
func (h *Registry) tpmArgs(v *VM, r runPaths, runAs string) []string {
	args := []string{"swtpm", "socket", "--tpm2",
		"--tpmstate", "dir=" + v.TPMDir(),
		"--ctrl", "type=unixio,path=" + r.TPMSock,
		"--log", "file=" + filepath.Join(v.Dir, LogDir, "tpm.log") + ",level=1",
		"--pid", "file=" + r.TPMPid,
		"--terminate", "--daemon", "--isolation", string(v.Config.IsolationPolicy())}
	if runAs != "" {
		args = append(args, "--runas", runAs)
	}
	return args
}

// Started is the outcome of Start.
type Started struct {
	Accel     string
	SerialLog string
	QEMUPid   int
	TPMPid    int
}

// TPM says which vTPM the VM runs with: "vTPM pid N", or "no TPM".
func (s *Started) TPM() string {
	if s.TPMPid == 0 {
		return "no TPM"
	}
	return fmt.Sprintf("vTPM pid %d", s.TPMPid)
}

// Start runs the pre-flight checks, then the vTPM instance (when the VM has
// an enabled TPM), then QEMU. Headless, it returns once QEMU runs; with
// Console it returns when the VM has stopped.
func (h *Registry) Start(ctx context.Context, v *VM, o StartOptions) (*Started, error) {
	if st := h.State(v); st.Running() {
		return nil, precondition(nil, "VM %s is already running (QEMU pid %d)", v.Name(), st.QEMU)
	} else if st.TPM != 0 {
		return nil, precondition([]errdefs.Remedy{do(errdefs.ActionVMStop, "vm", v.Name())},
			"VM %s is not running, but its vTPM instance is (pid %d); stop it", v.Name(), st.TPM)
	}
	accel, err := hostcheck.Accel(o.Accel)
	if err != nil {
		return nil, err
	}
	if err := h.Preflight(v); err != nil {
		return nil, err
	}
	r := h.run(v)
	os.RemoveAll(r.Dir)
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create run directory: %w", err)
	}
	logDir := filepath.Join(v.Dir, LogDir)
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		return nil, err
	}
	res := &Started{Accel: accel, SerialLog: filepath.Join(logDir, "serial.log")}
	if v.Config.TPMEnabled() {
		if err := h.startTPM(ctx, v, r); err != nil {
			os.RemoveAll(r.Dir)
			return nil, err
		}
		res.TPMPid = livePid(r.TPMPid, r.Dir)
	}
	stopTPM := func() {
		if pid := livePid(r.TPMPid, r.Dir); pid != 0 {
			syscall.Kill(pid, syscall.SIGTERM)
			waitGone(context.Background(), pid, 10*time.Second)
		}
		os.RemoveAll(r.Dir)
	}

	qlog, err := os.OpenFile(filepath.Join(logDir, "qemu.log"), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		stopTPM()
		return nil, err
	}
	defer qlog.Close()
	res.QEMUPid, err = h.startQEMU(ctx, v, r, accel, o, res.SerialLog, qlog)
	if o.Console {
		res.QEMUPid = -1
	}
	if err != nil {
		stopTPM()
		if o.Console {
			return res, err
		}
		return nil, err
	}
	return res, nil
}

// startTPM starts the vTPM instance from this executable and waits until it
// serves its control socket.
func (h *Registry) startTPM(ctx context.Context, v *VM, r runPaths) error {
	return h.startTPMFor(ctx, v, r, false)
}

// startTPMFor is startTPM; adopt starts the instance of a live
// migration's destination, on an empty state directory. It runs as vm
// start runs it and adopts the TPM arriving in the stream through the
// host service (HostSocket), since a process that dropped privileges can
// no longer read the keystore; without a host service it keeps root's
// user (confined all the same).
func (h *Registry) startTPMFor(ctx context.Context, v *VM, r runPaths, adopt bool) error {
	exe := h.Exe
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return err
		}
	}
	runAs, err := tpmUser(v.Config.TPMUser)
	if err != nil {
		return err
	}
	if adopt && runAs != "" && h.HostSocket == "" {
		h.log().Warn("the vTPM of a VM received by migration runs as root: no host service to adopt its TPM through", "vm", v.Name())
		runAs = ""
	}
	if err := os.MkdirAll(r.TPMRun, 0o700); err != nil {
		return fmt.Errorf("create the vTPM's run directory: %w", err)
	}
	if runAs != "" {
		if err := h.prepareRunAs(v, r, runAs); err != nil {
			if v.Config.TPMUser != "" {
				return err
			}
			// Only the default: keep VMs whose files lie out of the
			// user's reach running, and say how to confine them.
			h.log().Warn("the vTPM keeps running as root", "vm", v.Name(), "reason", err)
			runAs = ""
		}
	}
	cmd := exec.CommandContext(ctx, exe, h.tpmArgs(v, r, runAs)...)
	// The instance opens this registry's keystore, whatever the caller's
	// environment names.
	cmd.Env = append(os.Environ(), "VTPM_HOME="+h.Root)
	if h.HostSocket != "" {
		cmd.Env = append(cmd.Env, hostsvc.SocketEnv+"="+h.HostSocket)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(string(out)), "swtpm: "))
		return fmt.Errorf("the vTPM of %s did not start: %s (log: %s)", v.Name(), msg, filepath.Join(v.Dir, LogDir, "tpm.log"))
	}
	return nil
}

// afterQEMU waits for the vTPM instance to persist its state and exit
// (QEMU's exit sends it CMD_SHUTDOWN), then clears the run directory.
func (h *Registry) afterQEMU(ctx context.Context, v *VM, r runPaths) {
	if pid := livePid(r.TPMPid, r.Dir); pid != 0 {
		if !waitGone(ctx, pid, 10*time.Second) {
			syscall.Kill(pid, syscall.SIGTERM)
			if !waitGone(ctx, pid, 10*time.Second) {
				h.log().Warn("the vTPM instance did not exit; killed it (its state is crash-safe)", "vm", v.Name(), "pid", pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	os.RemoveAll(r.Dir)
}

// waitGone waits until pid has exited.
func waitGone(ctx context.Context, pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return true
		}
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			// A zombie has exited; its parent reaps it.
			if f := strings.Fields(string(st)); len(f) > 2 && f[2] == "Z" {
				return true
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// qmpTimeout bounds each exchange with QEMU's monitor.
const qmpTimeout = 10 * time.Second

// Stopped is the outcome of Stop.
type Stopped struct {
	// PoweredOff: the guest shut down by itself after the ACPI power
	// button; otherwise QEMU was told to quit after the timeout.
	PoweredOff bool
	// Timeout is how long the guest had to power off (0: none).
	Timeout time.Duration
}

// How says how the VM stopped.
func (s *Stopped) How() string {
	switch {
	case s.PoweredOff:
		return "powered off"
	case s.Timeout > 0:
		return fmt.Sprintf("quit (the guest did not power off within %v)", s.Timeout)
	}
	return "quit"
}

// Stop shuts a VM down: the ACPI power button, then QEMU's quit after
// timeout (0 quits at once). QEMU's exit makes the vTPM persist its state
// and exit; Stop waits for that.
func (h *Registry) Stop(ctx context.Context, v *VM, timeout time.Duration) (*Stopped, error) {
	r := h.run(v)
	st := h.State(v)
	res := &Stopped{Timeout: timeout}
	if !st.Running() {
		if st.TPM == 0 {
			return nil, precondition(nil, "VM %s is not running", v.Name())
		}
		h.afterQEMU(ctx, v, r)
		return res, nil
	}
	q, err := h.DialQMP(ctx, v)
	if err != nil {
		return nil, err
	}
	defer q.Close()
	if timeout > 0 {
		cctx, cancel := context.WithTimeout(ctx, qmpTimeout)
		err := q.SystemPowerdown(cctx)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("VM %s: power button: %w", v.Name(), err)
		}
		res.PoweredOff = waitGone(ctx, st.QEMU, timeout)
	}
	if !res.PoweredOff {
		cctx, cancel := context.WithTimeout(ctx, qmpTimeout)
		if err := q.Quit(cctx); err != nil {
			h.log().Warn("qmp quit", "vm", v.Name(), "err", err)
		}
		cancel()
		if !waitGone(ctx, st.QEMU, 30*time.Second) {
			syscall.Kill(st.QEMU, syscall.SIGKILL)
			waitGone(ctx, st.QEMU, 5*time.Second)
		}
	}
	h.afterQEMU(ctx, v, r)
	return res, nil
}

// lookupUser finds a user by name or uid.
func lookupUser(name string) (*user.User, error) {
	u, err := user.Lookup(name)
	if err != nil {
		if u, err2 := user.LookupId(name); err2 == nil {
			return u, nil
		}
	}
	return u, err
}

// DefaultTPMUsers are tried in order when vm.json names no tpm_user.
var DefaultTPMUsers = []string{"tss", "nobody"}

// tpmUser returns the user a vTPM instance started by this process drops
// to, from vm.json's tpm_user: "" when this process is not root, else the
// named user or the first of DefaultTPMUsers that exists. A bundle never
// asks for root: vm.json is untrusted, and the validator refuses it.
func tpmUser(configured string) (string, error) {
	if os.Geteuid() != 0 {
		return "", nil
	}
	if configured != "" {
		if _, err := lookupUser(configured); err != nil {
			return "", fmt.Errorf("tpm_user %q in %s: no such user; create it, or set tpm_user to another user (\"\" picks tss or nobody)", configured, ConfigFile)
		}
		return configured, nil
	}
	for _, name := range DefaultTPMUsers {
		if _, err := lookupUser(name); err == nil {
			return name, nil
		}
	}
	return "", fmt.Errorf("none of the users %v exists to run the vTPM as; create one (e.g. `useradd --system tss`), or set tpm_user in %s to an unprivileged user", DefaultTPMUsers, ConfigFile)
}

// prepareRunAs lets the vTPM, once it runs as name, reach its state
// directory and write its run directory: the vTPM's run directory becomes
// name's; the VM's own directories (bundle, run directory) become
// searchable by name's group, the shared ones vtpm made (data root, VM
// directory, run base) by everyone (they hold nothing readable by others).
// Any other directory on the way that name cannot search is an error, and
// then nothing is changed. The state directory itself is handed over by
// the instance (--runas).
func (h *Registry) prepareRunAs(v *VM, r runPaths, name string) error {
	uid, gid, err := sandbox.LookupUser(name) // fails closed: never uid 0
	if err != nil {
		return fmt.Errorf("vTPM user %s: %w", name, err)
	}
	own := map[string]bool{abs(v.Dir): true, abs(r.Dir): true}
	shared := map[string]bool{abs(h.Root): true, abs(h.VMsDir()): true, abs(runBase()): true}
	var fixes []func() error
	seen := map[string]bool{}
	for _, target := range []string{v.TPMDir(), r.TPMRun} {
		for d := filepath.Dir(abs(target)); !seen[d]; d = filepath.Dir(d) {
			seen[d] = true
			fix, err := searchable(d, uid, gid, own[d], shared[d], name)
			if err != nil {
				return err
			}
			if fix != nil {
				fixes = append(fixes, fix)
			}
		}
	}
	fixes = append(fixes, func() error { return os.Chown(r.TPMRun, uid, gid) })
	for _, fix := range fixes {
		if err := fix(); err != nil {
			return fmt.Errorf("prepare the VM's directories for the vTPM user %s: %w", name, err)
		}
	}
	return nil
}

func abs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// searchable checks that user uid (primary group gid, its only group after
// --runas) can search dir, or returns how to let it: by group for a VM's
// own directory, by others for a shared one.
func searchable(dir string, uid, gid int, own, shared bool, name string) (func() error, error) {
	st, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	s := st.Sys().(*syscall.Stat_t)
	mode := st.Mode().Perm()
	switch {
	case int(s.Uid) == uid && mode&0o100 != 0,
		int(s.Uid) != uid && int(s.Gid) == gid && mode&0o010 != 0,
		int(s.Uid) != uid && int(s.Gid) != gid && mode&0o001 != 0:
		return nil, nil
	case own && int(s.Uid) != uid:
		return func() error {
			if err := os.Chown(dir, -1, gid); err != nil {
				return err
			}
			return os.Chmod(dir, mode|0o010)
		}, nil
	case shared && int(s.Uid) != uid && int(s.Gid) != gid:
		return func() error { return os.Chmod(dir, mode|0o001) }, nil
	}
	return nil, fmt.Errorf("the vTPM runs as %s, who cannot reach its files through %s (mode %04o, uid %d, gid %d); run `chmod o+x %s`, move the VM's bundle, or set tpm_user in %s to a user that can reach it", name, dir, mode, s.Uid, s.Gid, dir, ConfigFile)
}
