package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
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

	"vtpm/internal/testutil"
)

// hostEnv is a host service started as a test would, and a vtpm other
// users can run (as swtpm and swtpm_setup, as libvirt finds them).
type hostEnv struct {
	base, bin, socket string
	svc               *testutil.Proc
}

// startHostService starts `vtpm host serve` answering users; activated
// starts it as systemd would, on a socket passed with LISTEN_FDS.
func startHostService(t *testing.T, activated bool, users ...string) *hostEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Missing(t, "the host service's tests run vTPMs as other users: run them as root")
	}
	base, err := os.MkdirTemp("", "vtpm-hostserve-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	e := &hostEnv{base: base, bin: filepath.Join(base, "bin"), socket: filepath.Join(base, "run", "host.sock")}
	for _, d := range []string{base, e.bin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		os.Chmod(d, 0o755)
	}
	b, err := os.ReadFile(testutil.Binary(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.bin, "vtpm"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	// `vtpm host serve` is vtpm-hostd's, found beside vtpm.
	hb, err := os.ReadFile(testutil.HostdBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.bin, "vtpm-hostd"), hb, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"swtpm", "swtpm_setup"} {
		if err := os.Symlink("vtpm", filepath.Join(e.bin, name)); err != nil {
			t.Fatal(err)
		}
	}
	root := filepath.Join(base, "root")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg, _ := json.Marshal(map[string][]string{"users": users})
	if err := os.WriteFile(filepath.Join(root, "hostsvc.json"), cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(e.bin, "vtpm"), "host", "serve", "--socket", e.socket, "--data-root", root)
	if activated {
		testutil.Need(t, "systemd-socket-activate")
		if err := os.MkdirAll(filepath.Dir(e.socket), 0o755); err != nil {
			t.Fatal(err)
		}
		// --socket names another path: the passed socket must win.
		cmd = exec.Command("systemd-socket-activate", "-l", e.socket,
			filepath.Join(e.bin, "vtpm"), "host", "serve", "--socket", e.socket+".unused", "--data-root", root)
	}
	cmd.Env = append(os.Environ(), "VTPM_HOST_TPM=none")
	e.svc = testutil.StartCmd(t, cmd, e.socket)
	return e
}

// as runs one of the binary's names as user, with libvirt's environment:
// HOME inherited from a root daemon, no VTPM_HOME.
func (e *hostEnv) as(t *testing.T, user, name string, args ...string) *exec.Cmd {
	uid, gid := userIDs(t, user)
	cmd := exec.Command(filepath.Join(e.bin, name), args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VTPM_HOME=") && !strings.HasPrefix(kv, "HOME=") && !strings.HasPrefix(kv, "XDG_DATA_HOME=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "HOME=/root", "VTPM_HOST_SOCKET="+e.socket)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	return cmd
}

func userIDs(t *testing.T, name string) (int, int) {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		testutil.Missing(t, "no user %s on this host", name)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return uid, gid
}

// stateDir is a new state directory owned by user, as libvirt makes them.
func (e *hostEnv) stateDir(t *testing.T, name, user string) string {
	t.Helper()
	dir := filepath.Join(e.base, name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	uid, gid := userIDs(t, user)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	return dir
}

// serve starts `swtpm socket --runas user` as user on dir and returns its
// data port.
func (e *hostEnv) serve(t *testing.T, user, dir string) (*testutil.Proc, int) {
	t.Helper()
	port := testutil.FreePorts(t, 2)
	cmd := e.as(t, user, "swtpm", "socket", "--tpm2", "--runas", user, "--tpmstate", "dir="+dir,
		"--server", fmt.Sprintf("type=tcp,port=%d", port), "--ctrl", fmt.Sprintf("type=tcp,port=%d", port+1),
		"--flags", "not-need-init,startup-clear")
	return testutil.StartCmd(t, cmd, fmt.Sprintf("127.0.0.1:%d", port)), port
}

// getRandom sends TPM2_GetRandom(8) on the data channel and checks the answer.
func getRandom(t *testing.T, port int) {
	t.Helper()
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	cmd := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
	if _, err := c.Write(cmd); err != nil {
		t.Fatal(err)
	}
	rsp := make([]byte, 20)
	if _, err := io.ReadFull(c, rsp); err != nil {
		t.Fatal(err)
	}
	if rc := binary.BigEndian.Uint32(rsp[6:10]); rc != 0 || binary.BigEndian.Uint16(rsp[10:12]) != 8 {
		t.Fatalf("TPM2_GetRandom answered %x", rsp)
	}
}

// checkSealed checks that dir holds sealed state owned by user.
func checkSealed(t *testing.T, dir, user string) {
	t.Helper()
	uid, _ := userIDs(t, user)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	sealed := false
	for _, e := range entries {
		st, err := os.Lstat(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if got := int(st.Sys().(*syscall.Stat_t).Uid); got != uid {
			t.Errorf("%s belongs to uid %d, want %s's", e.Name(), got, user)
		}
		sealed = sealed || strings.HasSuffix(e.Name(), ".sealed")
		if strings.HasPrefix(e.Name(), "tpm2-00.") {
			t.Errorf("%s: swtpm's files in a sealed directory", e.Name())
		}
	}
	if !sealed {
		t.Errorf("no sealed state in %s: %v", dir, entries)
	}
}

// swtpm_setup run as nobody and as tss, and `swtpm socket --runas tss` run
// as tss (as libvirt runs them: no VTPM_HOME, HOME=/root) manufacture and
// serve TPMs through the host service; with the service stopped, each
// fails with one error that names both attempts and how to start it.
func TestHostServiceForUnprivilegedVTPMs(t *testing.T) {
	e := startHostService(t, false, "tss", "nobody")
	setupArgs := func(dir string) []string {
		return []string{"--tpm2", "--tpm-state", dir, "--vmid", "vm1:9c6a2f0e-5a43-4a1e-8f0e-0d7e4e3e6a11",
			"--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"}
	}
	tests := []struct {
		name, user string
		setup      bool // swtpm_setup first; else the instance makes the TPM
	}{
		{"swtpm_setup as nobody", "nobody", true},
		{"swtpm_setup as tss", "tss", true},
		{"swtpm socket --runas tss", "tss", false},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := e.stateDir(t, fmt.Sprintf("tpm%d", i), tt.user)
			if tt.setup {
				out, err := e.as(t, tt.user, "swtpm_setup", setupArgs(dir)...).CombinedOutput()
				if err != nil || !bytes.Contains(out, []byte("Successfully authored TPM state.")) {
					t.Fatalf("swtpm_setup as %s: %v\n%s", tt.user, err, out)
				}
				checkSealed(t, dir, tt.user)
			}
			p, port := e.serve(t, tt.user, dir)
			getRandom(t, port)
			p.Kill()
			checkSealed(t, dir, tt.user)
		})
	}

	e.svc.Kill()
	for i, tt := range tests {
		t.Run(tt.name+" without the service", func(t *testing.T) {
			dir := e.stateDir(t, fmt.Sprintf("down%d", i), tt.user)
			var cmd *exec.Cmd
			if tt.setup {
				cmd = e.as(t, tt.user, "swtpm_setup", setupArgs(dir)...)
			} else {
				port := testutil.FreePorts(t, 2)
				cmd = e.as(t, tt.user, "swtpm", "socket", "--tpm2", "--runas", tt.user, "--tpmstate", "dir="+dir,
					"--server", fmt.Sprintf("type=tcp,port=%d", port), "--ctrl", fmt.Sprintf("type=tcp,port=%d", port+1))
			}
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("succeeded without the host service:\n%s", out)
			}
			for _, want := range []string{
				"cannot open the host keystore", "the host service did not answer", e.socket,
				"`systemctl start vtpm-host.socket`", "`vtpm host serve --socket " + e.socket + "`",
			} {
				if !bytes.Contains(out, []byte(want)) {
					t.Errorf("the error does not say %q:\n%s", want, out)
				}
			}
			if n := bytes.Count(out, []byte("cannot open the TPM's key")); n != 1 {
				t.Errorf("%d errors, want one:\n%s", n, out)
			}
		})
	}
}

// Under systemd the service gets its socket from vtpm-host.socket
// (LISTEN_FDS) and starts on the first connection.
func TestHostServeSocketActivated(t *testing.T) {
	e := startHostService(t, true, "tss")
	os.Chmod(e.socket, 0o666) // SocketMode= in vtpm-host.socket
	dir := e.stateDir(t, "tpm", "tss")
	out, err := e.as(t, "tss", "swtpm_setup", "--tpm2", "--tpm-state", dir, "--createek").CombinedOutput()
	if err != nil {
		t.Fatalf("swtpm_setup as tss: %v\n%s", err, out)
	}
	checkSealed(t, dir, "tss")
	if _, err := os.Stat(e.socket + ".unused"); err == nil {
		t.Error("the service listened on --socket instead of the socket it was passed")
	}
}
