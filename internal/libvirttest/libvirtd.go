package libvirttest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/testutil"
)

// URI is the connection of the system libvirtd the tests start.
const URI = "qemu:///system"

// Sockets of the system daemons (libvirt 9.0's defaults).
const (
	libvirtdSocket = "/run/libvirt/libvirt-sock"
	virtlogdSocket = "/run/libvirt/virtlogd-sock"
)

// SwtpmStorageDir is where libvirt keeps its domains' emulator TPMs, one
// directory per domain UUID.
const SwtpmStorageDir = "/var/lib/libvirt/swtpm"

// SwtpmLogDir is where libvirt has swtpm_setup and swtpm log, one
// <domain>-swtpm.log per domain.
const SwtpmLogDir = "/var/log/swtpm/libvirt/qemu"

// TPMDir is the state directory libvirt gives a domain's TPM 2.0.
func TPMDir(uuid string) string { return filepath.Join(SwtpmStorageDir, uuid, "tpm2") }

// SkipIfUnavailable skips t (fails it under CI=true) when libvirt cannot be
// run here: not root, libvirt not installed, or a libvirtd already running
// (its PATH is not the test's to choose).
func SkipIfUnavailable(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Missing(t, "needs root: the test runs the system libvirtd")
	}
	for _, tool := range []string{"libvirtd", "virtlogd", "virsh", "swtpm_ioctl"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Missing(t, "%s is not installed (scripts/setup.sh installs libvirt-daemon-system, libvirt-clients and swtpm-tools)", tool)
		}
	}
	if answers(libvirtdSocket) {
		testutil.Missing(t, "a libvirtd already answers on %s; stop it, the test starts its own with vtpm in its PATH", libvirtdSocket)
	}
}

// Config is how the test's libvirtd is started.
type Config struct {
	// BinDir comes first in libvirtd's PATH: it holds the swtpm and
	// swtpm_setup libvirt runs (swtpm_ioctl comes from swtpm-tools).
	BinDir string
	// Env is added to libvirtd's otherwise minimal environment (PATH, and
	// HOME=/root as a root service has). libvirt passes its environment on
	// to swtpm_setup and swtpm.
	Env []string
}

// Daemon is a libvirtd (and, if none ran, a virtlogd) started by a test.
type Daemon struct {
	logDir   string
	libvirtd *exec.Cmd
	done     chan struct{}
	virtlogd *exec.Cmd
}

// Start starts libvirtd in the foreground with cfg's PATH and environment
// and waits until it answers; both daemons are stopped at cleanup, after
// the cleanups registered later (a test's domains) have run.
func Start(ctx context.Context, t testing.TB, cfg Config) *Daemon {
	t.Helper()
	d := &Daemon{logDir: t.TempDir(), done: make(chan struct{})}
	env := []string{
		"PATH=" + cfg.BinDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
		"LANG=C",
	}
	env = append(env, cfg.Env...)

	// libvirtd logs QEMU's output through virtlogd; systemd would start it
	// by socket activation.
	if !answers(virtlogdSocket) {
		d.virtlogd = d.command("virtlogd", env)
		if err := d.virtlogd.Start(); err != nil {
			t.Fatalf("start virtlogd: %v", err)
		}
		t.Cleanup(func() { stop(d.virtlogd, nil) })
		if err := waitSocket(ctx, virtlogdSocket, nil); err != nil {
			t.Fatalf("virtlogd: %v\n%s", err, d.tail("virtlogd", 20))
		}
	}

	d.libvirtd = d.command("libvirtd", env, "--pid-file", filepath.Join(d.logDir, "libvirtd.pid"))
	if err := d.libvirtd.Start(); err != nil {
		t.Fatalf("start libvirtd: %v", err)
	}
	go func() { _ = d.libvirtd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		stop(d.libvirtd, d.done)
		if t.Failed() {
			t.Logf("libvirtd log tail:\n%s", d.tail("libvirtd", 40))
		}
	})
	if err := waitSocket(ctx, libvirtdSocket, d.done); err != nil {
		t.Fatalf("libvirtd: %v\n%s", err, d.tail("libvirtd", 40))
	}
	for {
		_, err := d.Virsh(ctx, "uri")
		if err == nil {
			break
		}
		select {
		case <-d.done:
			t.Fatalf("libvirtd exited: %v\n%s", err, d.tail("libvirtd", 40))
		case <-ctx.Done():
			t.Fatalf("libvirtd does not answer: %v\n%s", err, d.tail("libvirtd", 40))
		case <-time.After(200 * time.Millisecond):
		}
	}
	return d
}

// command prepares a daemon whose output goes to a log file of the test.
func (d *Daemon) command(name string, env []string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = env
	cmd.Dir = "/"
	if f, err := os.Create(filepath.Join(d.logDir, name+".log")); err == nil {
		cmd.Stdout, cmd.Stderr = f, f
	}
	return cmd
}

// tail is the end of a daemon's log, for failure reports.
func (d *Daemon) tail(name string, n int) string {
	return Tail(filepath.Join(d.logDir, name+".log"), n)
}

// Virsh runs virsh against the test's libvirtd and returns its standard
// output; a failure carries its standard error.
func (d *Daemon) Virsh(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-q", "-c", URI}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("virsh %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// MustVirsh is Virsh that fails the test.
func (d *Daemon) MustVirsh(ctx context.Context, t testing.TB, args ...string) string {
	t.Helper()
	out, err := d.Virsh(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// DomState is `virsh domstate`: "running", "shut off", ….
func (d *Daemon) DomState(ctx context.Context, name string) (string, error) {
	out, err := d.Virsh(ctx, "domstate", name)
	return strings.TrimSpace(out), err
}

// WaitDomState polls the domain's state until it is want.
func (d *Daemon) WaitDomState(ctx context.Context, name, want string) error {
	for {
		st, err := d.DomState(ctx, name)
		if err == nil && st == want {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("domain %s: wait for state %q (last %q, %v): %w", name, want, st, err, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// answers reports whether a unix socket accepts connections.
func answers(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// waitSocket waits until path accepts connections, or exited is closed.
func waitSocket(ctx context.Context, path string, exited <-chan struct{}) error {
	for !answers(path) {
		select {
		case <-exited:
			return errors.New("exited before " + path + " answered")
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// stop ends a daemon as its service manager would: SIGTERM, then SIGKILL
// if it lingers. done, if not nil, is closed once the process is reaped;
// otherwise stop reaps it.
func stop(cmd *exec.Cmd, done <-chan struct{}) {
	if cmd.Process == nil {
		return
	}
	if done == nil {
		ch := make(chan struct{})
		go func() { _ = cmd.Wait(); close(ch) }()
		done = ch
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
		return
	case <-time.After(15 * time.Second):
	}
	_ = cmd.Process.Kill()
	<-done
}

// Tail returns the last n lines of a file, for failure reports.
func Tail(name string, n int) string {
	b, err := os.ReadFile(name)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
