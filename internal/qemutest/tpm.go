package qemutest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TPMConfig describes a software TPM process that speaks the swtpm
// control protocol: real swtpm, or vtpm as its drop-in.
type TPMConfig struct {
	// Command is the program and its leading arguments, before "socket".
	// Default: $VTPM_TEST_SWTPM split on spaces, else "swtpm". For vtpm use
	// e.g. []string{"/path/to/vtpm", "swtpm"}.
	Command []string
	// StateDir holds the TPM state (and, by default, the socket). It is
	// created if needed. Reuse it to restart a TPM with its state.
	StateDir string
	// Socket is the control socket path; default StateDir/sock.
	Socket string
	// ExtraArgs are appended after the standard arguments.
	ExtraArgs []string
	// Env is added to the process's environment (e.g. VTPM_HOME=…), so
	// parallel tests need not change their own.
	Env []string
}

// TPM is a running software TPM process.
type TPM struct {
	Socket   string
	StateDir string
	LogFile  string

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
}

// SkipIfNoSWTPM skips t when the default TPM command is not installed.
func SkipIfNoSWTPM(t testing.TB) {
	t.Helper()
	cmd := defaultTPMCommand()
	if _, err := exec.LookPath(cmd[0]); err != nil {
		t.Skipf("%s not installed; skipping VM test", cmd[0])
	}
}

func defaultTPMCommand() []string {
	if c := strings.Fields(os.Getenv("VTPM_TEST_SWTPM")); len(c) > 0 {
		return c
	}
	return []string{"swtpm"}
}

// StartTPM starts `<command> socket --tpm2 --tpmstate dir=D --ctrl
// type=unixio,path=S` and waits for the control socket. The process is
// stopped at the end of the test. QEMU's quit also makes it exit.
func StartTPM(ctx context.Context, t testing.TB, cfg TPMConfig) (*TPM, error) {
	t.Helper()
	if len(cfg.Command) == 0 {
		cfg.Command = defaultTPMCommand()
	}
	if cfg.StateDir == "" {
		cfg.StateDir = ShortTempDir(t)
	}
	if cfg.Socket == "" {
		cfg.Socket = filepath.Join(cfg.StateDir, "sock")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("create tpm state dir: %w", err)
	}
	// A stale socket from a previous run would fool the wait below.
	if err := os.Remove(cfg.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale tpm socket: %w", err)
	}
	p := &TPM{
		Socket:   cfg.Socket,
		StateDir: cfg.StateDir,
		LogFile:  filepath.Join(t.TempDir(), "tpm.log"),
		exited:   make(chan struct{}),
	}
	args := append(cfg.Command[1:len(cfg.Command):len(cfg.Command)],
		"socket", "--tpm2",
		"--tpmstate", "dir="+cfg.StateDir,
		"--ctrl", "type=unixio,path="+cfg.Socket,
		"--log", "file="+p.LogFile+",level=1",
	)
	args = append(args, cfg.ExtraArgs...)
	p.cmd = exec.Command(cfg.Command[0], args...)
	if len(cfg.Env) > 0 {
		p.cmd.Env = append(os.Environ(), cfg.Env...)
	}
	out, err := os.Create(p.LogFile + ".out")
	if err != nil {
		return nil, fmt.Errorf("create tpm output log: %w", err)
	}
	p.cmd.Stdout, p.cmd.Stderr = out, out
	if err := p.cmd.Start(); err != nil {
		out.Close()
		return nil, fmt.Errorf("start %s: %w", cfg.Command[0], err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		out.Close()
		close(p.exited)
	}()
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Stop(sctx); err != nil {
			t.Logf("stop tpm: %v", err)
		}
		if t.Failed() {
			for _, f := range []string{p.LogFile, p.LogFile + ".out"} {
				if data, err := os.ReadFile(f); err == nil && len(data) > 0 {
					t.Logf("%s:\n%s", filepath.Base(f), tailString(string(data), 30))
				}
			}
		}
	})

	for {
		if _, err := os.Stat(cfg.Socket); err == nil {
			// vtpm makes its sockets before it opens its state: the TPM
			// runs once the control channel answers.
			if err := ctrlAnswers(ctx, cfg.Socket); err == nil {
				return p, nil
			}
		}
		select {
		case <-p.exited:
			data, _ := os.ReadFile(p.LogFile + ".out")
			return nil, fmt.Errorf("%s exited before it served %s: %v: %s", cfg.Command[0], cfg.Socket, p.waitErr, data)
		case <-ctx.Done():
			_ = p.Stop(context.Background())
			return nil, fmt.Errorf("wait for tpm socket %s: %w", cfg.Socket, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ctrlAnswers asks the control channel for its capabilities
// (CMD_GET_CAPABILITY) and reads the 8-byte answer.
func ctrlAnswers(ctx context.Context, socket string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := conn.Write([]byte{0, 0, 0, 1}); err != nil {
		return err
	}
	_, err = io.ReadFull(conn, make([]byte, 8))
	return err
}

// Stop terminates the TPM process (SIGTERM, then SIGKILL) and reaps it.
// A TPM that already exited (QEMU's quit sends it CMD_SHUTDOWN) is fine.
func (p *TPM) Stop(ctx context.Context) error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
	return errors.New("tpm did not exit on SIGTERM, killed it")
}

// Wait waits for the TPM process to exit and returns its exit error.
func (p *TPM) Wait(ctx context.Context) error {
	select {
	case <-p.exited:
		return p.waitErr
	case <-ctx.Done():
		return fmt.Errorf("wait for tpm: %w", ctx.Err())
	}
}

// Exited is closed when the TPM process has been reaped.
func (p *TPM) Exited() <-chan struct{} { return p.exited }

func tailString(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
