package hostcheck

import (
	"bufio"
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
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"vtpm/internal/errdefs"
	"vtpm/internal/instance"
	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm"
)

// ProbeResult is what the sandbox probe reports.
type ProbeResult struct {
	Error      string            `json:"error,omitempty"` // confining failed outright
	Landlock   int               `json:"landlock"`        // ABI the probe runs under, 0 = none
	Method     string            `json:"method"`          // how it entered Landlock (sandbox.Method*)
	Seccomp    string            `json:"seccomp"`         // /proc/self/status Seccomp:
	NoNewPrivs string            `json:"no_new_privs"`    // /proc/self/status NoNewPrivs:
	Dumpable   int               `json:"dumpable"`        // prctl(PR_GET_DUMPABLE)
	Tries      map[string]string `json:"tries"`           // operation → "ok" or the error
}

// ProbeOptions configure the sandbox probe.
type ProbeOptions struct {
	StateDir string // the probe's state directory (required)
	DataRoot string // the probe's data root
	Connect  string // a listening HOST:PORT the probe tries to connect to
	TryExec  bool   // execute a program once confined: the filter kills the probe
}

// ProbeArgs is the command line (after the executable) that runs the probe
// in a child: `vtpm doctor --probe-sandbox`, whose flags fill ProbeOptions.
func ProbeArgs(o ProbeOptions) []string {
	args := []string{"doctor", "--probe-sandbox", "--state", o.StateDir}
	if o.DataRoot != "" {
		args = append(args, "--data-root", o.DataRoot)
	}
	if o.Connect != "" {
		args = append(args, "--connect", o.Connect)
	}
	if o.TryExec {
		args = append(args, "--try-exec")
	}
	return args
}

// Probe confines this process with the policy of an instance whose state is
// in o.StateDir (instance.SandboxPolicy, sandbox.Enter, Sandbox.Seal: the very
// calls an instance makes), then tries what an instance must and must not be
// able to do, and writes the outcome to w as JSON. It re-executes the
// program (as Enter does), so it runs in a process of its own.
func Probe(w io.Writer, o ProbeOptions) error {
	if o.StateDir == "" {
		return errors.New("--probe-sandbox needs --state DIR")
	}
	res := ProbeResult{Tries: map[string]string{}}
	report := func() error { return json.NewEncoder(w).Encode(res) }
	// Of the data root, an instance may write only its generation record.
	var record string
	if root := o.DataRoot; root != "" {
		record = filepath.Join(root, ".probe-generation-record")
		if err := os.MkdirAll(root, 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(record, nil, 0o600); err != nil {
			return err
		}
	}
	policy := instance.SandboxPolicy(&swtpm.Options{StateDir: o.StateDir}, sandbox.Preferred, record)
	sb, err := sandbox.Enter(policy, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		res.Error = err.Error()
		return report()
	}
	res.Landlock, res.Method = sb.Landlock(), sb.Method()
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
	inside := filepath.Join(o.StateDir, ".probe-inside")
	res.Tries["write inside the state directory"] = outcome(writeAndRemove(inside))
	outside := filepath.Join(filepath.Dir(filepath.Clean(o.StateDir)), fmt.Sprintf(".vtpm-probe-outside-%d", os.Getpid()))
	res.Tries["write outside the state directory"] = outcome(writeAndRemove(outside))
	if record != "" {
		res.Tries["write the generation record"] = outcome(os.WriteFile(record, []byte("probe"), 0o600))
		res.Tries["write elsewhere in the data root"] = outcome(writeAndRemove(filepath.Join(o.DataRoot, fmt.Sprintf(".vtpm-probe-%d", os.Getpid()))))
	}
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
	if o.Connect != "" {
		err := sockErr
		if err == nil {
			err = connectTo(inet, o.Connect)
		}
		res.Tries["connect "+o.Connect] = outcome(err)
	}
	st, _ := os.ReadFile("/proc/self/status")
	res.Seccomp, res.NoNewPrivs = statusField(st, "Seccomp"), statusField(st, "NoNewPrivs")
	if o.TryExec {
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

// runProbe runs exe's sandbox probe in a scratch directory.
func runProbe(ctx context.Context, exe string) (*ProbeResult, error) {
	if exe == "" {
		return nil, errors.New("no executable to run the sandbox probe")
	}
	dir, err := os.MkdirTemp("", "vtpm-doctor-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	args := ProbeArgs(ProbeOptions{StateDir: filepath.Join(dir, "state"), DataRoot: filepath.Join(dir, "root"), Connect: ln.Addr().String()})
	out, err := exec.CommandContext(ctx, exe, args...).Output()
	if err != nil {
		return nil, fmt.Errorf("the sandbox probe failed: %w", err)
	}
	var res ProbeResult
	if err := json.Unmarshal(out, &res); err != nil {
		return nil, fmt.Errorf("the sandbox probe's report: %w", err)
	}
	return &res, nil
}

// SandboxChecks confine a child (exe's probe) exactly as an instance and
// report seccomp, Landlock and no_new_privs from what it could still do.
func SandboxChecks(ctx context.Context, exe string) []Check {
	res, err := runProbe(ctx, exe)
	if err == nil && res.Error != "" {
		err = errors.New(res.Error)
	}
	if err != nil {
		return []Check{missing("sandbox", err.Error(),
			errdefs.Do(errdefs.ActionSandboxProbe, "state", "/tmp/x").WithNote("see the failure"),
			advise("a kernel with seccomp and Landlock (Linux ≥ 5.13) is needed"))}
	}
	return sandboxChecks(res)
}

// sandboxChecks judges a probe's report.
func sandboxChecks(res *ProbeResult) []Check {
	denied := func(op string) bool { v, ok := res.Tries[op]; return ok && v != "ok" }
	allowed := func(op string) bool { return res.Tries[op] == "ok" }
	var cs []Check
	netDenied := denied("socket inet") && denied("socket inet6") && denied("socket netlink")
	for op := range res.Tries {
		if strings.HasPrefix(op, "connect ") {
			netDenied = netDenied && denied(op)
		}
	}
	if res.Seccomp == "2" && netDenied {
		cs = append(cs, ok("seccomp", "allow-list filter on every thread; network sockets and connect refused"))
	} else {
		cs = append(cs, missing("seccomp", fmt.Sprintf("the confined probe has Seccomp: %q and can still use the network: %v", res.Seccomp, res.Tries),
			advise("use a kernel built with CONFIG_SECCOMP_FILTER, and do not run vtpm under a seccomp policy that forbids seccomp(2)")))
	}
	switch {
	case res.Landlock > 0 && denied("write outside the state directory") && !denied("write inside the state directory") &&
		!allowed("write elsewhere in the data root") && !denied("write the generation record"):
		how := res.Method
		if how == sandbox.MethodReexec {
			how += ", a second program start for every instance (the kernel cannot restrict all threads in place)"
		}
		cs = append(cs, ok("landlock", fmt.Sprintf("ABI %d, entered %s: instances write only their state, their generation record, their sockets and pid file", res.Landlock, how)))
	case res.Landlock > 0:
		cs = append(cs, missing("landlock", fmt.Sprintf("ABI %d, but the probe's writes did not behave: %v", res.Landlock, res.Tries),
			advise("report this as a vtpm bug, with this output")))
	default:
		_, why := sandbox.LandlockABI()
		cs = append(cs, missing("landlock", fmt.Sprint(why),
			advise("kernel without Landlock; upgrade to Linux ≥ 5.13 with landlock in lsm= (for example lsm=landlock,lockdown,yama,apparmor,bpf on the kernel command line)")))
	}
	if res.NoNewPrivs == "1" && res.Dumpable == 0 {
		cs = append(cs, ok("no_new_privs", "set; instances are not dumpable"))
	} else {
		cs = append(cs, missing("no_new_privs", fmt.Sprintf("NoNewPrivs: %q, dumpable %d", res.NoNewPrivs, res.Dumpable),
			advise("the kernel refused prctl(PR_SET_NO_NEW_PRIVS or PR_SET_DUMPABLE); check for an outer sandbox (container runtime) that blocks prctl")))
	}
	return cs
}

// UserCheck reports which user instances run as.
func UserCheck() Check {
	if os.Geteuid() != 0 {
		return ok("user", fmt.Sprintf("instances started by this user run as uid %d", os.Geteuid()))
	}
	name := "tss"
	if _, err := user.Lookup(name); err != nil {
		name = "nobody"
	}
	return warn("user", "instances started as root stay root unless given --runas (seccomp, Landlock and no_new_privs still confine them)",
		advise("start instances with --runas %s (libvirt: swtpm_user = \"%s\" in /etc/libvirt/qemu.conf), with the state directory owned by that user; vm start does so itself", name, name))
}

// NamespaceCheck reports whether user namespaces are available.
func NamespaceCheck() Check {
	if b, err := os.ReadFile("/proc/sys/user/max_user_namespaces"); err == nil && strings.TrimSpace(string(b)) == "0" {
		return warn("namespaces", "user namespaces are disabled (user.max_user_namespaces = 0)",
			advise("sysctl -w user.max_user_namespaces=15000 (and persist it in /etc/sysctl.d/)"))
	}
	if b, err := os.ReadFile("/proc/sys/kernel/unprivileged_userns_clone"); err == nil && strings.TrimSpace(string(b)) == "0" {
		return warn("namespaces", "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)",
			advise("sysctl -w kernel.unprivileged_userns_clone=1, or run vtpm as root"))
	}
	if _, err := os.Stat("/proc/self/ns/user"); err != nil {
		return warn("namespaces", "kernel without namespaces: "+err.Error(),
			advise("use a kernel with CONFIG_USER_NS and CONFIG_NET_NS"))
	}
	return ok("namespaces", "user, mount and network namespaces available")
}

// MemlockCheck reports whether key material can be locked in memory.
func MemlockCheck() Check {
	raise := advise("raise the limit: ulimit -l 64, or LimitMEMLOCK=64K in the service unit")
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim); err == nil && lim.Cur < 4096 && os.Geteuid() != 0 {
		return missing("locked memory", fmt.Sprintf("RLIMIT_MEMLOCK is %d bytes: key material cannot be locked in memory", lim.Cur), raise)
	}
	l, err := sandbox.LockedBytes(32)
	if err != nil {
		return missing("locked memory", err.Error(), raise)
	}
	l.Wipe()
	return ok("locked memory", "key material is kept in mlock'd memory, left out of core dumps")
}
