// Package testutil builds the vtpm binary for tests and runs TPM processes
// (vtpm or the real swtpm, the peer we stay compatible with) on free ports.
package testutil

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Binary builds cmd/vtpm once per test process and returns its path. A
// symlink named "swtpm" sits beside it for multi-call tests. Commands vtpm
// hands to vtpm-hostd (host serve, trust, list, …) need HostdBinary too.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		buildDir, buildErr = os.MkdirTemp("", "vtpm-bin-")
		if buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", filepath.Join(buildDir, "vtpm"), "./cmd/vtpm")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/vtpm: %v\n%s", err, out)
			return
		}
		buildErr = os.Symlink("vtpm", filepath.Join(buildDir, "swtpm"))
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(buildDir, "vtpm")
}

// HostdBinary builds cmd/vtpm-hostd once per test process, beside the vtpm
// of Binary (where vtpm looks for it first), and returns its path.
func HostdBinary(t testing.TB) string {
	t.Helper()
	return besideBinary(t, "vtpm-hostd")
}

// KeyserviceBinary builds cmd/vtpm-keyservice once per test process,
// beside the vtpm of Binary (where `vtpm keyservice …` looks for it), and
// returns its path.
func KeyserviceBinary(t testing.TB) string {
	t.Helper()
	return besideBinary(t, "vtpm-keyservice")
}

// besideBuilds builds each of vtpm's helper executables once per process.
var besideBuilds = map[string]func() error{}

var besideMu sync.Mutex

// besideBinary builds ./cmd/NAME into the directory of Binary's vtpm, once
// per test process, and returns its path.
func besideBinary(t testing.TB, name string) string {
	t.Helper()
	dir := filepath.Dir(Binary(t))
	besideMu.Lock()
	build, ok := besideBuilds[name]
	if !ok {
		build = sync.OnceValue(func() error {
			_, file, _, _ := runtime.Caller(0)
			cmd := exec.Command("go", "build", "-o", filepath.Join(dir, name), "./cmd/"+name)
			cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..")
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("go build ./cmd/%s: %v\n%s", name, err, out)
			}
			return nil
		})
		besideBuilds[name] = build
	}
	besideMu.Unlock()
	if err := build(); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, name)
}

// Need skips the test when a peer tool is not installed.
func Need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			Missing(t, "%s is not installed (CI installs it: see .ci/run)", tool)
		}
	}
}

// FreePorts returns n consecutive free TCP ports on 127.0.0.1 (the swtpm TCTI
// wants the control port right after the data port).
func FreePorts(t testing.TB, n int) int {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		base := l.Addr().(*net.TCPAddr).Port
		l.Close()
		ok := true
		for i := 1; i < n; i++ {
			l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(base+i))
			if err != nil {
				ok = false
				break
			}
			l2.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatal("no free consecutive ports")
	return 0
}

// Proc is a running TPM process.
type Proc struct {
	Cmd    *exec.Cmd
	Stderr *bytes.Buffer
	done   chan struct{}
	err    error
}

// Start runs a TPM process (exe is the vtpm or swtpm binary; args follow
// "socket") with the given environment additions and stops it at cleanup.
// ready is a socket path or host:port that must accept connections before Start returns.
func Start(t testing.TB, exe string, env []string, ready string, args ...string) *Proc {
	t.Helper()
	var cmd *exec.Cmd
	if filepath.Base(exe) == "vtpm" {
		cmd = exec.Command(exe, append([]string{"swtpm", "socket"}, args...)...)
	} else {
		cmd = exec.Command(exe, append([]string{"socket"}, args...)...)
	}
	cmd.Env = append(os.Environ(), env...)
	return StartCmd(t, cmd, ready)
}

// StartCmd runs a TPM process prepared by the caller (another interface
// than socket, inherited files) and stops it at cleanup. ready is as for
// Start.
func StartCmd(t testing.TB, cmd *exec.Cmd, ready string) *Proc {
	t.Helper()
	p := &Proc{Cmd: cmd, Stderr: &bytes.Buffer{}, done: make(chan struct{})}
	cmd.Stderr = p.Stderr
	cmd.Stdout = p.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.Kill() })
	if ready != "" {
		if err := p.WaitReady(ready, 10*time.Second); err != nil {
			t.Fatalf("%s did not come up: %v\n%s", filepath.Base(cmd.Path), err, p.Stderr)
		}
	}
	return p
}

// WaitReady waits until addr (a unix path or host:port) accepts a connection.
func (p *Proc) WaitReady(addr string, d time.Duration) error {
	network := "unix"
	if _, _, err := net.SplitHostPort(addr); err == nil {
		network = "tcp"
	}
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("process exited: %v", p.err)
		default:
		}
		if c, err := net.Dial(network, addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %v", addr, d)
}

// Wait waits for the process to exit and returns its error.
func (p *Proc) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill kills the process (if running) and reaps it.
func (p *Proc) Kill() {
	if p.Cmd.Process != nil && !p.Exited() {
		p.Cmd.Process.Kill()
	}
	<-p.done
}

// Run runs a command and returns its combined output, failing the test on error.
func Run(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	out, err := RunErr(env, name, args...)
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return out
}

// RunErr runs a command and returns its combined output and error.
func RunErr(env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Missing skips the test because a capability it needs (root, Landlock,
// seccomp, QEMU, OVMF, a peer tool) is missing here, except under CI
// (CI=true), where it fails: CI provides every capability the suite needs,
// so a skip there would hide a missing one.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and a capability this test needs is missing: "+format, args...)
	}
	t.Skipf(format, args...)
}
