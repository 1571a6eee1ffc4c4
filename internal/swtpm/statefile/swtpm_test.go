package statefile

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/testutil"
)

// Helpers that drive the real swtpm 0.7.1, the peer we must stay
// byte-compatible with.

func requireSwtpm(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"swtpm", "swtpm_ioctl"} {
		if _, err := exec.LookPath(bin); err != nil {
			testutil.Missing(t, "%s is not installed; install the swtpm and swtpm-tools packages to run this compatibility test", bin)
		}
	}
}

// shortTempDir keeps unix socket paths under the 108-byte limit.
func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "st")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

type realSwtpm struct {
	dir  string
	port int
	cmd  *exec.Cmd
	done chan error
	log  *bytes.Buffer
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startSwtpm runs swtpm on state directory dir. With initTPM it is ready for
// commands; without, it waits for INIT over the control channel.
func startSwtpm(t *testing.T, dir string, initTPM bool, extra ...string) *realSwtpm {
	t.Helper()
	s := &realSwtpm{dir: dir, port: freePort(t), done: make(chan error, 1), log: &bytes.Buffer{}}
	args := []string{"socket", "--tpm2"}
	if !slices.Contains(extra, "--tpmstate") {
		args = append(args, "--tpmstate", "dir="+dir)
	}
	args = append(args,
		"--ctrl", "type=unixio,path="+s.ctrl(),
		"--server", "type=tcp,bindaddr=127.0.0.1,port="+strconv.Itoa(s.port),
	)
	if initTPM {
		args = append(args, "--flags", "not-need-init,startup-clear")
	}
	args = append(args, extra...)
	s.cmd = exec.Command("swtpm", args...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting swtpm: %v", err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-s.done
	})
	// Readiness wait only; nothing is asserted about time.
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", s.port))
		if err == nil {
			c.Close()
			if _, err := os.Stat(s.ctrl()); err == nil {
				return s
			}
		}
		select {
		case err := <-s.done:
			s.done <- err
			t.Fatalf("swtpm exited early (%v): %s", err, s.log)
		default:
		}
		if i > 500 {
			t.Fatalf("swtpm did not start listening: %s", s.log)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *realSwtpm) ctrl() string { return filepath.Join(s.dir, "ctrl") }

// ioctl runs swtpm_ioctl against the control socket and returns its output.
func (s *realSwtpm) ioctl(args ...string) (string, error) {
	out, err := exec.Command("swtpm_ioctl", append([]string{"--unix", s.ctrl()}, args...)...).CombinedOutput()
	return string(out), err
}

// shutdown stops swtpm cleanly so that it has written its state.
func (s *realSwtpm) shutdown(t *testing.T) {
	t.Helper()
	if out, err := s.ioctl("-s"); err != nil {
		t.Fatalf("swtpm_ioctl -s: %v: %s", err, out)
	}
	if err := <-s.done; err != nil {
		t.Fatalf("swtpm exited with %v: %s", err, s.log)
	}
	s.done <- nil
}

// tcpTPM is a go-tpm transport over swtpm's raw data channel.
type tcpTPM struct{ c net.Conn }

func (s *realSwtpm) dial(t *testing.T) *tcpTPM {
	t.Helper()
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", s.port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &tcpTPM{c: c}
}

func (p *tcpTPM) Send(cmd []byte) ([]byte, error) {
	if _, err := p.c.Write(cmd); err != nil {
		return nil, err
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(p.c, hdr); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[2:])
	if n < 10 {
		return nil, fmt.Errorf("response size %d too small", n)
	}
	rsp := make([]byte, n)
	copy(rsp, hdr)
	_, err := io.ReadFull(p.c, rsp[10:])
	return rsp, err
}

const testNVIndex = tpm2.TPMHandle(0x01500016)

func nvPublic(size int) tpm2.TPMSNVPublic {
	return tpm2.TPMSNVPublic{
		NVIndex: testNVIndex,
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			OwnerWrite: true, OwnerRead: true, AuthWrite: true, AuthRead: true,
			NoDA: true, NT: tpm2.TPMNTOrdinary,
		},
		DataSize: uint16(size),
	}
}

func nvHandle(t *testing.T, size int) tpm2.AuthHandle {
	t.Helper()
	pub := nvPublic(size)
	name, err := tpm2.NVName(&pub)
	if err != nil {
		t.Fatal(err)
	}
	return tpm2.AuthHandle{Handle: testNVIndex, Name: *name, Auth: tpm2.PasswordAuth(nil)}
}

func nvDefineWrite(t *testing.T, tpm *tcpTPM, data []byte) {
	t.Helper()
	def := tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(nvPublic(len(data))),
	}
	if _, err := def.Execute(tpm); err != nil {
		t.Fatalf("NV_DefineSpace: %v", err)
	}
	h := nvHandle(t, len(data))
	wr := tpm2.NVWrite{
		AuthHandle: h,
		NVIndex:    tpm2.NamedHandle{Handle: h.Handle, Name: h.Name},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data},
	}
	if _, err := wr.Execute(tpm); err != nil {
		t.Fatalf("NV_Write: %v", err)
	}
}

func nvRead(t *testing.T, tpm *tcpTPM, size int) []byte {
	t.Helper()
	h := nvHandle(t, size)
	rd := tpm2.NVRead{
		AuthHandle: h,
		NVIndex:    tpm2.NamedHandle{Handle: h.Handle, Name: h.Name},
		Size:       uint16(size),
	}
	rsp, err := rd.Execute(tpm)
	if err != nil {
		t.Fatalf("NV_Read: %v", err)
	}
	return rsp.Data.Buffer
}

// startup sends TPM2_Startup(CLEAR) after an INIT over the control channel.
func startup(t *testing.T, tpm *tcpTPM) {
	t.Helper()
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("TPM2_Startup: %v", err)
	}
}

// swtpmResult extracts the hex TPM result swtpm_ioctl printed, or "".
func swtpmResult(out string) string {
	const marker = "TPM result from PTM_SET_STATEBLOB: "
	i := strings.Index(out, marker)
	if i < 0 {
		return ""
	}
	return strings.Fields(out[i+len(marker):])[0]
}
