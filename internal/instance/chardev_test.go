package instance_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	tpmtransport "github.com/google/go-tpm/tpm2/transport"

	"vtpm/internal/testutil"
)

// startChardev runs `swtpm chardev` of implementation im with data as its
// --fd 3 and a unix control socket (ctrlOpts adds to its sub-options).
// env adds to the environment.
func startChardev(t *testing.T, im impl, data *os.File, env []string, ctrlOpts string, args ...string) *tpmProc {
	t.Helper()
	p := &tpmProc{impl: im, dir: shortDir(t)}
	p.stateDir = filepath.Join(p.dir, "state")
	if err := os.Mkdir(p.stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	p.ctrlPath = filepath.Join(p.dir, "ctrl")
	p.ctrlArgs = []string{"--unix", p.ctrlPath}
	args = append([]string{"chardev", "--fd", "3", "--tpm2", "--tpmstate", "dir=" + p.stateDir,
		"--pid", "file=" + filepath.Join(p.dir, "pid"), "--ctrl", "type=unixio,path=" + p.ctrlPath + ctrlOpts}, args...)
	if im == ourVtpm {
		args = append([]string{"swtpm"}, args...)
		env = append(env, "VTPM_HOME="+filepath.Join(p.dir, "home"))
	}
	cmd := exec.Command(im.exe(t), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.ExtraFiles = []*os.File{data}
	p.Proc = testutil.StartCmd(t, cmd, p.ctrlPath)
	return p
}

// exitsWithin waits for p to exit and fails unless it exits 0.
func exitsWithin(t *testing.T, p *tpmProc, d time.Duration, after string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("%s after %s: %v, want exit 0\n%s", p.impl, after, err, p.Stderr)
	}
}

// TestChardevSocketpair runs `swtpm chardev --fd` on one end of a socket
// pair, as swtpm's tests and vtpm_proxy-style users do: TPM commands go
// over the other end, plain and with the simulator prefix, the control
// channel answers, and the TPM ends cleanly when the peer hangs up.
func TestChardevSocketpair(t *testing.T) {
	t.Parallel()
	needTools(t)
	caps := map[impl]string{}
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			pair := socketpair(t)
			p := startChardev(t, im, pair[1], nil, "", "--flags", "not-need-init,startup-clear")
			pair[1].Close()
			conn, err := net.FileConn(pair[0])
			pair[0].Close() // FileConn holds a copy
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()

			// Started by --flags: TPM2_Startup answers TPM_RC_INITIALIZE.
			startup := unhex("8001 0000000c 00000144 0000")
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := conn.Write(startup); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 64)
			n, err := conn.Read(got)
			if err != nil {
				t.Fatal(err)
			}
			if want := unhex("8001 0000000a 00000100"); !bytes.Equal(got[:n], want) {
				t.Errorf("TPM2_Startup: % x, want % x", got[:n], want)
			}
			for _, tr := range []tpmtransport.TPM{&tpmConn{c: conn}, &simConn{c: conn}} {
				r, err := tpm2.GetRandom{BytesRequested: 16}.Execute(tr)
				if err != nil || len(r.RandomBytes.Buffer) != 16 {
					t.Fatalf("TPM2_GetRandom over %T: %v\n%s", tr, err, p.Stderr)
				}
			}
			caps[im] = p.mustIoctl(t, "-c")
			p.mustIoctl(t, "-e")
			conn.Close()
			exitsWithin(t, p, 10*time.Second, "the data channel hung up")
		})
	}
	if caps[ourVtpm] != caps[realSwtpm] {
		t.Errorf("CMD_GET_CAPABILITY: vtpm %q, swtpm %q", caps[ourVtpm], caps[realSwtpm])
	}
}

// TestChardevControlChannel is swtpm's test_tpm2_ctrlchannel2 (its first
// part) against both: `swtpm chardev` on a pseudo terminal whose other
// side nobody opens, driven over its control socket, whose mode and owner
// follow --ctrl. vtpm runs with swtpm's state format asked for, since the
// test looks for swtpm's volatile state file by name.
func TestChardevControlChannel(t *testing.T) {
	t.Parallel()
	needTools(t)
	owner := ""
	var uid, gid int
	if os.Getuid() == 0 {
		u, err := user.Lookup("nobody")
		if err != nil {
			t.Fatal(err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		owner = fmt.Sprintf(",uid=%d,gid=%d", uid, gid)
	}
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			pty, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
			if err != nil {
				testutil.Missing(t, "no pseudo terminals: %v", err)
			}
			defer pty.Close()
			p := startChardev(t, im, pty, []string{"VTPM_STATE_FORMAT=swtpm"}, ",mode=0621"+owner)
			pty.Close()
			sock := p.ctrlPath
			if out := p.mustIoctl(t, "-c"); !regexp.MustCompile(`^ptm capability is 0x[[:xdigit:]]+\n$`).MatchString(out) {
				t.Errorf("-c: %q", out)
			}
			fi, err := os.Stat(sock)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o621 {
				t.Errorf("control socket mode %o, want 621", fi.Mode().Perm())
			}
			if st := fi.Sys().(*syscall.Stat_t); owner != "" && (int(st.Uid) != uid || int(st.Gid) != gid) {
				t.Errorf("control socket owner %d:%d, want %d:%d", st.Uid, st.Gid, uid, gid)
			}
			p.mustIoctl(t, "-i")
			p.mustIoctl(t, "-v")
			if _, err := os.Stat(filepath.Join(p.stateDir, "tpm2-00.volatilestate")); err != nil {
				t.Errorf("CMD_STORE_VOLATILE wrote no swtpm volatile state file: %v", err)
			}
			p.mustIoctl(t, "--stop")
			if out := p.mustIoctl(t, "-g"); !regexp.MustCompile(`^ptm configuration flags: 0x[[:xdigit:]]+\n$`).MatchString(out) {
				t.Errorf("-g: %q", out)
			}
			p.mustIoctl(t, "-s")
			exitsWithin(t, p, 10*time.Second, "CMD_SHUTDOWN")
			if _, err := os.Stat(filepath.Join(p.dir, "pid")); !os.IsNotExist(err) {
				t.Errorf("pid file after exit: %v, want it removed", err)
			}
		})
	}
}

// TestChardevDevice: --chardev opens the character device itself (here a
// new pseudo terminal master), inside the sandbox (Landlock lets it open
// the device), and the TPM serves its control channel until CMD_SHUTDOWN.
func TestChardevDevice(t *testing.T) {
	t.Parallel()
	needTools(t)
	if _, err := os.Stat("/dev/ptmx"); err != nil {
		testutil.Missing(t, "no pseudo terminals: %v", err)
	}
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			p := &tpmProc{impl: im, dir: shortDir(t)}
			p.stateDir = filepath.Join(p.dir, "state")
			p.ctrlPath = filepath.Join(p.dir, "ctrl")
			p.ctrlArgs = []string{"--unix", p.ctrlPath}
			args := []string{"chardev", "--chardev", "/dev/ptmx", "--tpm2", "--tpmstate", "dir=" + p.stateDir,
				"--ctrl", "type=unixio,path=" + p.ctrlPath}
			env := os.Environ()
			if im == ourVtpm {
				args = append([]string{"swtpm"}, args...)
				env = append(env, "VTPM_HOME="+filepath.Join(p.dir, "home"))
			}
			if err := os.Mkdir(p.stateDir, 0o700); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(im.exe(t), args...)
			cmd.Env = env
			p.Proc = testutil.StartCmd(t, cmd, p.ctrlPath)
			p.mustIoctl(t, "-i")
			if out := p.mustIoctl(t, "-e"); out != "tpmEstablished is 0\n" {
				t.Errorf("-e: %q", out)
			}
			// The device is the data channel: another one is refused.
			c := dialCtrl(t, p.ctrlPath)
			other := socketpair(t)
			if _, _, err := c.WriteMsgUnix(unhex("00000010"), syscall.UnixRights(int(other[1].Fd())), nil); err != nil {
				t.Fatal(err)
			}
			rsp := make([]byte, 4)
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(c, rsp); err != nil {
				t.Fatal(err)
			}
			if want := unhex("0000001f"); !bytes.Equal(rsp, want) {
				t.Errorf("CMD_SET_DATAFD beside --chardev: % x, want % x", rsp, want)
			}
			c.Close()
			p.mustIoctl(t, "-s")
			exitsWithin(t, p, 10*time.Second, "CMD_SHUTDOWN")
		})
	}
}

// TestChardevDaemon: `swtpm chardev --fd N --daemon` (swtpm's
// test_ctrlchannel2) returns once the TPM serves, and the TPM in the
// background still has descriptor N as its data channel.
func TestChardevDaemon(t *testing.T) {
	t.Parallel()
	needTools(t)
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			dir := shortDir(t)
			stateDir, ctrl, pid := filepath.Join(dir, "state"), filepath.Join(dir, "ctrl"), filepath.Join(dir, "pid")
			if err := os.Mkdir(stateDir, 0o700); err != nil {
				t.Fatal(err)
			}
			pair := socketpair(t)
			// Descriptor 3 is where a background copy used to get its
			// readiness pipe.
			args := []string{"chardev", "--fd", "3", "--tpm2", "--daemon", "--tpmstate", "dir=" + stateDir,
				"--pid", "file=" + pid, "--ctrl", "type=unixio,path=" + ctrl, "--flags", "not-need-init,startup-clear"}
			env := os.Environ()
			if im == ourVtpm {
				args = append([]string{"swtpm"}, args...)
				env = append(env, "VTPM_HOME="+filepath.Join(dir, "home"))
			}
			cmd := exec.Command(im.exe(t), args...)
			cmd.Env = env
			cmd.ExtraFiles = []*os.File{pair[1]}
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s chardev --daemon: %v\n%s", im, err, out)
			}
			pair[1].Close()
			defer func() { // stop the background TPM whatever happened
				testutil.RunErr(nil, "swtpm_ioctl", "--unix", ctrl, "-s")
			}()
			conn, err := net.FileConn(pair[0])
			pair[0].Close()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if r, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(&tpmConn{c: conn}); err != nil || len(r.RandomBytes.Buffer) != 8 {
				t.Fatalf("TPM2_GetRandom on the background TPM's --fd: %v", err)
			}
			if out, err := testutil.RunErr(nil, "swtpm_ioctl", "--unix", ctrl, "-s"); err != nil {
				t.Fatalf("swtpm_ioctl -s: %v: %s", err, out)
			}
			deadline := time.Now().Add(10 * time.Second)
			for _, err := os.Stat(pid); err == nil; _, err = os.Stat(pid) {
				if time.Now().After(deadline) {
					t.Fatal("the background TPM kept its pid file 10 s after CMD_SHUTDOWN")
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}
