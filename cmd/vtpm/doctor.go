package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/paths"
	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm"
)

// Check statuses.
const (
	statusOK      = "ok"
	statusWarning = "warning"
	statusMissing = "missing"
)

// check is one line of `vtpm doctor`.
type check struct {
	Name   string `json:"name"`
	Status string `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

func doctorCmd() *cobra.Command {
	var (
		asJSON     bool
		probe      bool
		probeState string
		probeRoot  string
		probeConn  string
		probeKill  bool
	)
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check what this host provides to run and isolate vTPMs",
		Long: `Check this host: the sandbox of the vTPM processes (seccomp, Landlock,
no_new_privs, namespaces, locked memory), KVM, QEMU and its TPM emulator
support, the OVMF firmware files, how the keystore's master key is protected,
and the data root's permissions. Each check is ok, warning or missing, with
the fix. The exit status is 1 if anything is missing.

The sandbox is checked for real: a child process confines itself exactly as
a vTPM instance does and tries what an instance must not be able to do.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if probe {
				return runSandboxProbe(cmd.OutOrStdout(), probeState, probeRoot, probeConn, probeKill)
			}
			checks := doctorChecks(cmd.Context())
			return printChecks(cmd.OutOrStdout(), checks, asJSON)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the checks as JSON")
	cmd.Flags().BoolVar(&probe, "probe-sandbox", false, "confine this process as an instance and report what it can still do")
	cmd.Flags().StringVar(&probeState, "state", "", "the probe's state directory (with --probe-sandbox)")
	cmd.Flags().StringVar(&probeRoot, "data-root", "", "the probe's data root (with --probe-sandbox; default: the host's)")
	cmd.Flags().StringVar(&probeConn, "connect", "", "a listening HOST:PORT the probe tries to connect to (with --probe-sandbox)")
	cmd.Flags().BoolVar(&probeKill, "try-exec", false, "make the probe execute a program once confined: the filter kills it (with --probe-sandbox)")
	for _, f := range []string{"probe-sandbox", "state", "data-root", "connect", "try-exec"} {
		cmd.Flags().MarkHidden(f)
	}
	return cmd
}

func printChecks(w io.Writer, checks []check, asJSON bool) error {
	missing := 0
	for _, c := range checks {
		if c.Status == statusMissing {
			missing++
		}
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(checks); err != nil {
			return err
		}
	} else {
		for _, c := range checks {
			fmt.Fprintf(w, "%-8s %-20s %s\n", c.Status, c.Name, c.Detail)
			if c.Fix != "" {
				fmt.Fprintf(w, "%-8s %-20s fix: %s\n", "", "", c.Fix)
			}
		}
	}
	if missing > 0 {
		return fmt.Errorf("%d of %d checks missing", missing, len(checks))
	}
	return nil
}

func doctorChecks(ctx context.Context) []check {
	var checks []check
	checks = append(checks, sandboxChecks(ctx)...)
	checks = append(checks, userCheck(), userNamespaceCheck(), memlockCheck(), kvmCheck())
	checks = append(checks, qemuChecks(ctx)...)
	checks = append(checks, ovmfCheck(), keystoreCheck(), rollbackCheck(), dataRootCheck())
	return checks
}

// probeResult is what `vtpm doctor --probe-sandbox` prints.
type probeResult struct {
	Error      string            `json:"error,omitempty"` // confining failed outright
	Landlock   int               `json:"landlock"`        // ABI the probe runs under, 0 = none
	Seccomp    string            `json:"seccomp"`         // /proc/self/status Seccomp:
	NoNewPrivs string            `json:"no_new_privs"`    // /proc/self/status NoNewPrivs:
	Dumpable   int               `json:"dumpable"`        // prctl(PR_GET_DUMPABLE)
	Tries      map[string]string `json:"tries"`           // operation → "ok" or the error
}

// runSandboxProbe confines this process with the policy of an instance whose
// state is in stateDir (sandbox.ForInstance, sandbox.Enter, Sandbox.Seal:
// the very calls an instance makes), then tries what an instance must and
// must not be able to do, and prints the outcome as JSON.
func runSandboxProbe(w io.Writer, stateDir, dataRoot, connect string, tryExec bool) error {
	if stateDir == "" {
		return errors.New("--probe-sandbox needs --state DIR")
	}
	if dataRoot == "" {
		dataRoot = paths.DataRoot()
	}
	res := probeResult{Tries: map[string]string{}}
	report := func() error { return json.NewEncoder(w).Encode(res) }
	cfg := &swtpm.Config{StateDir: stateDir, Isolation: sandbox.Preferred}
	// Of the data root, an instance may write only its generation record.
	record := filepath.Join(dataRoot, ".probe-generation-record")
	if err := os.MkdirAll(dataRoot, 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(record, nil, 0o600); err != nil {
		return err
	}
	sb, err := sandbox.Enter(sandbox.ForInstance(cfg, record), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		res.Error = err.Error()
		return report()
	}
	res.Landlock = sb.Landlock()
	dump, _ := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	res.Dumpable = dump
	// An AF_INET socket made before the filter, as the instance's listeners are.
	inet, sockErr := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err := sb.Seal(); err != nil {
		res.Error = err.Error()
		return report()
	}
	outcome := func(err error) string {
		if err != nil {
			return err.Error()
		}
		return "ok"
	}
	inside := filepath.Join(stateDir, ".probe-inside")
	res.Tries["write inside the state directory"] = outcome(writeAndRemove(inside))
	outside := filepath.Join(filepath.Dir(filepath.Clean(stateDir)), fmt.Sprintf(".vtpm-probe-outside-%d", os.Getpid()))
	res.Tries["write outside the state directory"] = outcome(writeAndRemove(outside))
	res.Tries["write the generation record"] = outcome(os.WriteFile(record, []byte("probe"), 0o600))
	res.Tries["write elsewhere in the data root"] = outcome(writeAndRemove(filepath.Join(dataRoot, fmt.Sprintf(".vtpm-probe-%d", os.Getpid()))))
	for _, fam := range []struct {
		name string
		af   int
	}{{"inet", unix.AF_INET}, {"inet6", unix.AF_INET6}, {"netlink", unix.AF_NETLINK}, {"unix", unix.AF_UNIX}, {"packet", unix.AF_PACKET}} {
		fd, err := unix.Socket(fam.af, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if fam.af == unix.AF_NETLINK || fam.af == unix.AF_PACKET {
			fd, err = unix.Socket(fam.af, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		}
		if err == nil {
			unix.Close(fd)
		}
		res.Tries["socket "+fam.name] = outcome(err)
	}
	if connect != "" {
		err := sockErr
		if err == nil {
			err = connectTo(inet, connect)
		}
		res.Tries["connect "+connect] = outcome(err)
	}
	st, _ := os.ReadFile("/proc/self/status")
	res.Seccomp, res.NoNewPrivs = statusField(st, "Seccomp"), statusField(st, "NoNewPrivs")
	if tryExec {
		// Not in the allow-list: the kernel kills the process here.
		err := syscall.Exec("/bin/true", []string{"true"}, nil)
		res.Tries["execve"] = outcome(err)
	}
	return report()
}

func writeAndRemove(path string) error {
	if err := os.WriteFile(path, []byte("probe\n"), 0o600); err != nil {
		return err
	}
	return os.Remove(path)
}

func connectTo(fd int, hostport string) error {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return err
	}
	ip := net.ParseIP(host).To4()
	if ip == nil {
		return fmt.Errorf("%s: not an IPv4 address", host)
	}
	sa := &unix.SockaddrInet4{Port: p}
	copy(sa.Addr[:], ip)
	return unix.Connect(fd, sa)
}

func statusField(status []byte, name string) string {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// sandboxProbe runs `vtpm doctor --probe-sandbox` in a scratch directory.
func sandboxProbe(ctx context.Context) (*probeResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "vtpm-doctor-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	state, root := filepath.Join(dir, "state"), filepath.Join(dir, "root")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, exe, "doctor", "--probe-sandbox", "--state", state, "--data-root", root, "--connect", ln.Addr().String()).Output()
	if err != nil {
		return nil, fmt.Errorf("the sandbox probe failed: %w", err)
	}
	var res probeResult
	if err := json.Unmarshal(out, &res); err != nil {
		return nil, fmt.Errorf("the sandbox probe's report: %w", err)
	}
	return &res, nil
}

func sandboxChecks(ctx context.Context) []check {
	res, err := sandboxProbe(ctx)
	if err == nil && res.Error != "" {
		err = errors.New(res.Error)
	}
	if err != nil {
		return []check{{Name: "sandbox", Status: statusMissing, Detail: err.Error(),
			Fix: "run `vtpm doctor --probe-sandbox --state /tmp/x` to see the failure; a kernel with seccomp and Landlock (Linux ≥ 5.13) is needed"}}
	}
	denied := func(op string) bool { v, ok := res.Tries[op]; return ok && v != "ok" }
	var cs []check
	// seccomp
	netDenied := denied("socket inet") && denied("socket inet6") && denied("socket netlink")
	for op := range res.Tries {
		if strings.HasPrefix(op, "connect ") {
			netDenied = netDenied && denied(op)
		}
	}
	if res.Seccomp == "2" && netDenied {
		cs = append(cs, check{Name: "seccomp", Status: statusOK, Detail: "allow-list filter on every thread; network sockets and connect refused"})
	} else {
		cs = append(cs, check{Name: "seccomp", Status: statusMissing, Detail: fmt.Sprintf("the confined probe has Seccomp: %q and can still use the network: %v", res.Seccomp, res.Tries),
			Fix: "use a kernel built with CONFIG_SECCOMP_FILTER, and do not run vtpm under a seccomp policy that forbids seccomp(2)"})
	}
	// Landlock
	switch {
	case res.Landlock > 0 && denied("write outside the state directory") && !denied("write inside the state directory") &&
		denied("write elsewhere in the data root") && !denied("write the generation record"):
		cs = append(cs, check{Name: "landlock", Status: statusOK, Detail: fmt.Sprintf("ABI %d: instances write only their state, their generation record, their sockets and pid file", res.Landlock)})
	case res.Landlock > 0:
		cs = append(cs, check{Name: "landlock", Status: statusMissing, Detail: fmt.Sprintf("ABI %d, but the probe's writes did not behave: %v", res.Landlock, res.Tries),
			Fix: "report this as a vtpm bug, with this output"})
	default:
		_, why := sandbox.LandlockABI()
		cs = append(cs, check{Name: "landlock", Status: statusMissing, Detail: fmt.Sprint(why),
			Fix: "kernel without Landlock; upgrade to Linux ≥ 5.13 with landlock in lsm= (for example lsm=landlock,lockdown,yama,apparmor,bpf on the kernel command line)"})
	}
	if res.NoNewPrivs == "1" && res.Dumpable == 0 {
		cs = append(cs, check{Name: "no_new_privs", Status: statusOK, Detail: "set; instances are not dumpable"})
	} else {
		cs = append(cs, check{Name: "no_new_privs", Status: statusMissing, Detail: fmt.Sprintf("NoNewPrivs: %q, dumpable %d", res.NoNewPrivs, res.Dumpable),
			Fix: "the kernel refused prctl(PR_SET_NO_NEW_PRIVS or PR_SET_DUMPABLE); check for an outer sandbox (container runtime) that blocks prctl"})
	}
	return cs
}

func userCheck() check {
	if os.Geteuid() != 0 {
		return check{Name: "user", Status: statusOK, Detail: fmt.Sprintf("instances started by this user run as uid %d", os.Geteuid())}
	}
	name := "tss"
	if _, err := user.Lookup(name); err != nil {
		name = "nobody"
	}
	return check{Name: "user", Status: statusWarning, Detail: "instances started as root stay root unless given --runas (seccomp, Landlock and no_new_privs still confine them)",
		Fix: fmt.Sprintf("start instances with --runas %s (libvirt: user = \"%s\" in /etc/libvirt/qemu.conf's swtpm_user), with the state directory owned by that user", name, name)}
}

func userNamespaceCheck() check {
	if b, err := os.ReadFile("/proc/sys/user/max_user_namespaces"); err == nil && strings.TrimSpace(string(b)) == "0" {
		return check{Name: "namespaces", Status: statusWarning, Detail: "user namespaces are disabled (user.max_user_namespaces = 0)",
			Fix: "sysctl -w user.max_user_namespaces=15000 (and persist it in /etc/sysctl.d/)"}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/unprivileged_userns_clone"); err == nil && strings.TrimSpace(string(b)) == "0" {
		return check{Name: "namespaces", Status: statusWarning, Detail: "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)",
			Fix: "sysctl -w kernel.unprivileged_userns_clone=1, or run vtpm as root"}
	}
	if _, err := os.Stat("/proc/self/ns/user"); err != nil {
		return check{Name: "namespaces", Status: statusWarning, Detail: "kernel without namespaces: " + err.Error(),
			Fix: "use a kernel with CONFIG_USER_NS and CONFIG_NET_NS"}
	}
	return check{Name: "namespaces", Status: statusOK, Detail: "user, mount and network namespaces available"}
}

func memlockCheck() check {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim); err == nil && lim.Cur < 4096 && os.Geteuid() != 0 {
		return check{Name: "locked memory", Status: statusMissing, Detail: fmt.Sprintf("RLIMIT_MEMLOCK is %d bytes: key material cannot be locked in memory", lim.Cur),
			Fix: "raise the limit: ulimit -l 64, or LimitMEMLOCK=64K in the service unit"}
	}
	l, err := sandbox.LockedBytes(32)
	if err != nil {
		return check{Name: "locked memory", Status: statusMissing, Detail: err.Error(),
			Fix: "raise the limit: ulimit -l 64, or LimitMEMLOCK=64K in the service unit"}
	}
	l.Wipe()
	return check{Name: "locked memory", Status: statusOK, Detail: "key material is kept in mlock'd memory, left out of core dumps"}
}

// kvmGetAPIVersion is KVM_GET_API_VERSION, _IO(0xAE, 0x00).
const kvmGetAPIVersion = 0xAE00

func kvmCheck() check {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		fix := "enable virtualisation (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd"
		if errors.Is(err, fs.ErrPermission) {
			fix = "add this user to the kvm group (usermod -aG kvm USER) and log in again"
		}
		return check{Name: "kvm", Status: statusMissing, Detail: err.Error(), Fix: fix}
	}
	defer f.Close()
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	if err != nil || v != 12 {
		return check{Name: "kvm", Status: statusMissing, Detail: fmt.Sprintf("KVM_GET_API_VERSION = %d, %v (want 12)", v, err),
			Fix: "use a kernel whose KVM has the stable API (Linux ≥ 2.6.22)"}
	}
	return check{Name: "kvm", Status: statusOK, Detail: "/dev/kvm usable, API version 12"}
}

var (
	qemuVersionRE = regexp.MustCompile(`version (\d+)\.(\d+)`)
	tpmEmulatorRE = regexp.MustCompile(`(?m)^\s*emulator\s`)
)

func qemuChecks(ctx context.Context) []check {
	const name = "qemu"
	exe, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return []check{{Name: name, Status: statusMissing, Detail: "qemu-system-x86_64 is not installed", Fix: "apt install qemu-system-x86 (QEMU ≥ 7.2)"}}
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, exe, "--version").Output()
	m := qemuVersionRE.FindSubmatch(out)
	if err != nil || m == nil {
		return []check{{Name: name, Status: statusMissing, Detail: fmt.Sprintf("%s --version: %v %q", exe, err, firstLine(out)), Fix: "reinstall QEMU (≥ 7.2)"}}
	}
	major, _ := strconv.Atoi(string(m[1]))
	minor, _ := strconv.Atoi(string(m[2]))
	cs := []check{{Name: name, Status: statusOK, Detail: fmt.Sprintf("%s %d.%d", exe, major, minor)}}
	if major < 7 || major == 7 && minor < 2 {
		cs[0] = check{Name: name, Status: statusMissing, Detail: fmt.Sprintf("%s is QEMU %d.%d", exe, major, minor), Fix: "upgrade QEMU to 7.2 or newer"}
	}
	// QEMU 7.2 lists the backends and exits 1: the list is what counts.
	out, _ = exec.CommandContext(ctx, exe, "-tpmdev", "help").CombinedOutput()
	if !tpmEmulatorRE.Match(out) {
		cs = append(cs, check{Name: "qemu tpm-emulator", Status: statusMissing, Detail: fmt.Sprintf("-tpmdev help does not list emulator: %q", strings.TrimSpace(string(out))),
			Fix: "install a QEMU built with TPM support (Debian: qemu-system-x86)"})
	} else {
		cs = append(cs, check{Name: "qemu tpm-emulator", Status: statusOK, Detail: "-tpmdev emulator supported"})
	}
	return cs
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(string(b), "\n")
	return s
}

func ovmfCheck() check {
	files := []string{"/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"}
	var absent []string
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			absent = append(absent, f)
		}
	}
	if len(absent) > 0 {
		return check{Name: "ovmf", Status: statusMissing, Detail: "absent: " + strings.Join(absent, ", "), Fix: "apt install ovmf"}
	}
	return check{Name: "ovmf", Status: statusOK, Detail: strings.Join(files, ", ")}
}

func keystoreCheck() check {
	root := paths.DataRoot()
	if _, err := os.Stat(filepath.Join(root, "keystore")); errors.Is(err, fs.ErrNotExist) {
		return check{Name: "keystore", Status: statusWarning, Detail: fmt.Sprintf("no keystore in %s yet; it is created by the first vTPM, sealed to /dev/tpmrm0 if it opens, else in a file", root),
			Fix: "on a host with a TPM, check that /dev/tpmrm0 opens for this user before starting the first vTPM"}
	}
	host, err := keybroker.Open(root, keystore.Options{HostTPM: os.Getenv("VTPM_HOST_TPM"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return check{Name: "keystore", Status: statusMissing, Detail: err.Error(), Fix: "see the error above; VTPM_HOST_TPM selects the host TPM"}
	}
	defer host.Close()
	p := host.Keystore().Protection()
	if p.Kind == "tpm" {
		return check{Name: "keystore", Status: statusOK, Detail: "master key sealed to the host TPM: " + p.Detail}
	}
	return check{Name: "keystore", Status: statusWarning, Detail: "master key in a file (" + p.Detail + "): anyone who copies the data root has the keys",
		Fix: "on a host with a TPM, recreate the keystore sealed to it (VTPM_HOST_TPM=device:/dev/tpmrm0) and re-wrap the TPM keys to it"}
}

func dataRootCheck() check {
	root := paths.DataRoot()
	st, err := os.Stat(root)
	if errors.Is(err, fs.ErrNotExist) {
		return check{Name: "data root", Status: statusWarning, Detail: root + " does not exist yet; the first vTPM creates it with mode 0700"}
	}
	if err != nil {
		return check{Name: "data root", Status: statusMissing, Detail: err.Error(), Fix: "run vtpm doctor as the user that runs the vTPMs"}
	}
	uid := int(st.Sys().(*syscall.Stat_t).Uid)
	switch {
	case uid != os.Geteuid():
		return check{Name: "data root", Status: statusMissing, Detail: fmt.Sprintf("%s is owned by uid %d, not by this user (uid %d)", root, uid, os.Geteuid()),
			Fix: fmt.Sprintf("chown -R %d %s, or run vtpm as its owner", os.Geteuid(), root)}
	case st.Mode().Perm()&0o077 != 0:
		return check{Name: "data root", Status: statusMissing, Detail: fmt.Sprintf("%s has mode %04o: other users can reach the keys", root, st.Mode().Perm()),
			Fix: "chmod 700 " + root}
	}
	return check{Name: "data root", Status: statusOK, Detail: fmt.Sprintf("%s mode %04o, owned by this user", root, st.Mode().Perm())}
}
