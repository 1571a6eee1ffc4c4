package instance_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/sandbox"
	"vtpm/internal/testutil"
)

// needSandbox skips when the kernel lacks what the sandbox tests prove.
func needSandbox(t *testing.T) {
	t.Helper()
	if err := sandbox.SeccompAvailable(); err != nil {
		testutil.Missing(t, "no seccomp: %v", err)
	}
	if _, err := sandbox.LandlockABI(); err != nil {
		testutil.Missing(t, "no Landlock: %v", err)
	}
}

// procStatus returns the fields of /proc/pid/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// TestInstanceIsSandboxed runs vtpm instances as QEMU, libvirt and the
// tools do and checks that the running process is confined (seccomp filter,
// no_new_privs) and still does its job under the confinement: tpm2-tools
// over the swtpm TCTI, NV written and read back, swtpm_ioctl -s.
func TestInstanceIsSandboxed(t *testing.T) {
	t.Parallel()
	needTools(t)
	needSandbox(t)
	testutil.Need(t, "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_getrandom")
	tests := []struct {
		name        string
		transport   transport
		args        []string
		wantSeccomp string
	}{
		{"tcp, default action kill", tcpBoth, nil, "2"},
		{"unix sockets, isolation required", unixBoth, []string{"--isolation", "required"}, "2"},
		{"tcp data, unix ctrl, action log", tcpDataUnixCtrl, []string{"--seccomp", "action=log"}, "2"},
		{"action none: Landlock only", tcpBoth, []string{"--seccomp", "action=none"}, "0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// swtpm_setup makes the pid file and watches its size through
			// its own descriptor: the pid is written into that file.
			pidFile := filepath.Join(shortDir(t), "vtpm.pid")
			watched, err := os.Create(pidFile)
			if err != nil {
				t.Fatal(err)
			}
			defer watched.Close()
			p := startTPM(t, ourVtpm, tpmConfig{transport: tc.transport, args: append([]string{"--pid", "file=" + pidFile}, tc.args...)})
			// The sockets listen before the filter is installed; an answer
			// on the control channel comes after.
			p.mustIoctl(t, "-i")
			st := procStatus(t, p.Cmd.Process.Pid)
			if st["Seccomp"] != tc.wantSeccomp || st["NoNewPrivs"] != "1" {
				t.Errorf("/proc/PID/status: Seccomp: %q, NoNewPrivs: %q; want %q and 1", st["Seccomp"], st["NoNewPrivs"], tc.wantSeccomp)
			}
			nv := []byte("written under seccomp and Landlock")
			p.writeMarks(t, nv, [32]byte{1})
			if got := p.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("NV index reads %q, want %q", got, nv)
			}
			if r := p.tpm2(t, "tpm2_getrandom", "--hex", "8"); len(r) != 16 {
				t.Errorf("tpm2_getrandom --hex 8: %q", r)
			}
			if b, err := os.ReadFile(pidFile); err != nil || string(b) != strconv.Itoa(p.Cmd.Process.Pid) {
				t.Errorf("pid file: %q, %v; want %d", b, err, p.Cmd.Process.Pid)
			}
			if fi, err := watched.Stat(); err != nil || fi.Size() != int64(len(strconv.Itoa(p.Cmd.Process.Pid))) {
				t.Errorf("the pid file's first descriptor sees %v, %v: the pid was not written into the file", fi.Size(), err)
			}
			// Re-executed inside the sandbox, the process is still the one started.
			if st := procStatus(t, p.Cmd.Process.Pid); st["Seccomp"] != tc.wantSeccomp {
				t.Errorf("after traffic: Seccomp: %q", st["Seccomp"])
			}
			p.shutdown(t)
			if _, err := os.Stat(pidFile); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("pid file left behind on exit (Landlock must allow removing it): %v", err)
			}
			if tc.wantSeccomp == "2" && strings.Contains(p.Stderr.String(), "isolation") {
				t.Errorf("the instance warned about its isolation:\n%s", p.Stderr)
			}
		})
	}
}

// TestInstanceIsNotDumpable starts instances directly as an unprivileged
// user. A process is normally dumpable, and its /proc/PID files belong to its
// user; a non-dumpable one's belong to root (and it cannot be ptraced or core
// dumped by its user). --isolation none is the control.
func TestInstanceIsNotDumpable(t *testing.T) {
	t.Parallel()
	needTools(t)
	needSandbox(t)
	if os.Geteuid() != 0 {
		testutil.Missing(t, "starting a process as another user needs root")
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		testutil.Missing(t, "no user nobody")
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	exe := testutil.Binary(t)
	if err := os.Chmod(filepath.Dir(exe), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		isolation string
		wantOwner int
	}{
		{"preferred", 0},
		{"none", uid},
	}
	for _, tc := range tests {
		t.Run(tc.isolation, func(t *testing.T) {
			t.Parallel()
			dir := shortDir(t)
			if err := os.Chown(dir, uid, gid); err != nil {
				t.Fatal(err)
			}
			ctrl := filepath.Join(dir, "ctrl")
			cmd := exec.Command(exe, "swtpm", "socket", "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
				"--ctrl", "type=unixio,path="+ctrl, "--isolation", tc.isolation)
			cmd.Env = append(os.Environ(), "VTPM_HOME="+filepath.Join(dir, "home"))
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
			var stderr bytes.Buffer // read only once the process is gone or on failure
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			p := &tpmProc{Proc: &testutil.Proc{Cmd: cmd, Stderr: &stderr}, impl: ourVtpm, dir: dir, ctrlArgs: []string{"--unix", ctrl}}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			if err := waitSocket(ctrl); err != nil {
				t.Fatalf("%v\n%s", err, &stderr)
			}
			p.mustIoctl(t, "-i") // served: every part of the sandbox is in place
			var fi syscall.Stat_t
			if err := syscall.Stat(filepath.Join("/proc", strconv.Itoa(cmd.Process.Pid), "status"), &fi); err != nil {
				t.Fatal(err)
			}
			if int(fi.Uid) != tc.wantOwner {
				t.Errorf("/proc/PID/status of an instance running as uid %d is owned by uid %d, want %d", uid, fi.Uid, tc.wantOwner)
			}
			if out, code := p.ioctl(t, "-s"); code != 0 {
				t.Errorf("swtpm_ioctl -s: exit %d: %s", code, out)
			}
		})
	}
}

// waitSocket waits until the unix socket at path accepts a connection.
func waitSocket(path string) error {
	var err error
	for range 500 {
		var c net.Conn
		if c, err = net.Dial("unix", path); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("%s: %w", path, err)
}

// probeReport is `vtpm doctor --probe-sandbox`'s output.
type probeReport struct {
	Error      string            `json:"error"`
	Landlock   int               `json:"landlock"`
	Seccomp    string            `json:"seccomp"`
	NoNewPrivs string            `json:"no_new_privs"`
	Dumpable   int               `json:"dumpable"`
	Tries      map[string]string `json:"tries"`
}

// TestSandboxProbe confines a process exactly as an instance is confined
// (the hidden `vtpm doctor --probe-sandbox` calls the same SandboxPolicy,
// Enter and Seal as instance.New and Run) and proves what it can and cannot do.
func TestSandboxProbe(t *testing.T) {
	t.Parallel()
	needSandbox(t)
	dir := t.TempDir()
	state, root := filepath.Join(dir, "state"), filepath.Join(dir, "root")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	out, err := exec.Command(testutil.Binary(t), "doctor", "--probe-sandbox", "--state", state, "--data-root", root, "--connect", addr).Output()
	if err != nil {
		t.Fatalf("probe: %v\n%s", err, out)
	}
	var r probeReport
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("probe output %q: %v", out, err)
	}
	if r.Error != "" || r.Landlock < 1 || r.Seccomp != "2" || r.NoNewPrivs != "1" || r.Dumpable != 0 {
		t.Errorf("probe: error %q, Landlock ABI %d, Seccomp %q, NoNewPrivs %q, dumpable %d; want no error, ABI ≥ 1, 2, 1, 0",
			r.Error, r.Landlock, r.Seccomp, r.NoNewPrivs, r.Dumpable)
	}
	eperm, eacces := syscall.EPERM.Error(), syscall.EACCES.Error()
	tests := []struct {
		try  string
		want string // "ok" or the end of the error
	}{
		{"write inside the state directory", "ok"},
		{"write outside the state directory", eacces},
		{"write the generation record", "ok"},
		{"write elsewhere in the data root", eacces},
		{"socket inet", eperm},
		{"socket inet6", eperm},
		{"socket netlink", eperm},
		{"socket packet", eperm},
		{"socket unix", eperm},
		{"connect " + addr, eperm},
	}
	for _, tc := range tests {
		got, ok := r.Tries[tc.try]
		if !ok || (tc.want == "ok" && got != "ok") || (tc.want != "ok" && !strings.HasSuffix(got, tc.want)) {
			t.Errorf("%s: %q, want %q", tc.try, got, tc.want)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".vtpm-probe-outside-*")); len(left) > 0 {
		t.Errorf("the probe wrote outside its state directory: %v", left)
	}
	if _, err := os.Stat(state); err != nil {
		t.Errorf("state directory: %v", err)
	}

	// A system call outside the allow-list (execve) kills the process.
	err = exec.Command(testutil.Binary(t), "doctor", "--probe-sandbox", "--state", state, "--data-root", root, "--try-exec").Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGSYS {
		t.Errorf("execve under the filter: %v, want the process killed by SIGSYS", err)
	}
}

// TestIsolationPolicy checks what --isolation does with a missing part:
// required refuses to start and names it, preferred runs without it.
func TestIsolationPolicy(t *testing.T) {
	t.Parallel()
	needTools(t)
	tests := []struct {
		name    string
		args    []string
		wantErr string // "" = starts
	}{
		{"required without seccomp", []string{"--isolation", "required", "--seccomp", "action=none"}, "seccomp is turned off by --seccomp action=none"},
		{"unknown policy", []string{"--isolation", "sometimes"}, "--isolation sometimes: want required, preferred or none"},
		{"preferred without seccomp", []string{"--isolation", "preferred", "--seccomp", "action=none"}, ""},
		{"none", []string{"--isolation", "none"}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := shortDir(t)
			sock := filepath.Join(dir, "ctrl")
			args := append([]string{"swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + filepath.Join(dir, "state"), "--ctrl", "type=unixio,path=" + sock}, tc.args...)
			if tc.wantErr != "" {
				cmd := exec.Command(testutil.Binary(t), args...)
				cmd.Env = append(os.Environ(), "VTPM_HOME="+filepath.Join(dir, "home"))
				out, err := cmd.CombinedOutput()
				if code := exitCode(t, err); code != 1 || !strings.Contains(string(out), tc.wantErr) {
					t.Fatalf("exit %d, output %q; want exit 1 naming %q", code, out, tc.wantErr)
				}
				if _, err := os.Stat(sock); err == nil {
					t.Errorf("the refused instance created its socket")
				}
				return
			}
			p := startTPM(t, ourVtpm, tpmConfig{transport: ctrlOnly, args: tc.args})
			p.mustIoctl(t, "-i")
			if got := procStatus(t, p.Cmd.Process.Pid)["Seccomp"]; got != "0" {
				t.Errorf("Seccomp: %q, want 0 (no filter)", got)
			}
			p.shutdown(t)
		})
	}
}
