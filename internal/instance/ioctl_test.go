package instance_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/testutil"
)

// These tests drive vtpm with the distribution's swtpm_ioctl and tpm2-tools
// and run the real swtpm 0.7.1 beside it: whatever swtpm answers is what
// vtpm must answer.

// impl is a TPM implementation under test.
type impl string

const (
	realSwtpm impl = "swtpm" // the real swtpm, the reference
	ourVtpm   impl = "vtpm"
)

var impls = []impl{realSwtpm, ourVtpm}

func (i impl) exe(t *testing.T) string {
	if i == ourVtpm {
		return testutil.Binary(t)
	}
	return "swtpm"
}

// transport is how a TPM process exposes its channels.
type transport int

const (
	// tcpDataUnixCtrl: --server type=tcp,port=P and --ctrl type=unixio. The
	// swtpm TCTI wants its control channel on P+1, so the test bridges that
	// TCP port to the unix socket.
	tcpDataUnixCtrl transport = iota
	// tcpBoth: --server type=tcp,port=P and --ctrl type=tcp,port=P+1.
	tcpBoth
	// unixBoth: --server type=unixio,path=S and --ctrl type=unixio,path=S.ctrl.
	unixBoth
	// ctrlOnly: --ctrl type=unixio and no data channel until CMD_SET_DATAFD,
	// as QEMU runs it.
	ctrlOnly
)

// tpmConfig describes a TPM process to start.
type tpmConfig struct {
	transport transport
	stateDir  string   // "" = a fresh directory
	home      string   // VTPM_HOME for vtpm; "" = a fresh directory
	args      []string // more `swtpm socket` arguments
}

// tpmProc is a running TPM process and the ways to reach it.
type tpmProc struct {
	*testutil.Proc
	impl     impl
	dir      string   // scratch directory for sockets and files
	stateDir string   // --tpmstate dir=
	ctrlArgs []string // swtpm_ioctl's transport arguments
	ctrlPath string   // unix control socket, when there is one
	tcti     string   // -T for tpm2-tools
}

func needTools(t *testing.T) {
	t.Helper()
	testutil.Need(t, "swtpm", "swtpm_ioctl", "tpm2_startup", "tpm2_nvread", "tpm2_pcrread")
}

// shortDir keeps unix socket paths under the 108-byte limit that
// t.TempDir's long names can break.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vtc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startTPM starts a stopped TPM (no CMD_INIT yet) of implementation im.
func startTPM(t *testing.T, im impl, cfg tpmConfig) *tpmProc {
	t.Helper()
	p := &tpmProc{impl: im, dir: shortDir(t), stateDir: cfg.stateDir}
	if p.stateDir == "" {
		p.stateDir = filepath.Join(p.dir, "state")
		if err := os.Mkdir(p.stateDir, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"--tpm2", "--tpmstate", "dir=" + p.stateDir}
	var ready string
	switch cfg.transport {
	case tcpDataUnixCtrl, tcpBoth:
		port := testutil.FreePorts(t, 2)
		ready = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		args = append(args, "--server", "type=tcp,port="+strconv.Itoa(port))
		p.tcti = fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", port)
		if cfg.transport == tcpBoth {
			args = append(args, "--ctrl", "type=tcp,port="+strconv.Itoa(port+1))
			p.ctrlArgs = []string{"--tcp", fmt.Sprintf("127.0.0.1:%d", port+1)}
		} else {
			p.ctrlPath = filepath.Join(p.dir, "ctrl")
			args = append(args, "--ctrl", "type=unixio,path="+p.ctrlPath)
			p.ctrlArgs = []string{"--unix", p.ctrlPath}
		}
	case ctrlOnly:
		p.ctrlPath = filepath.Join(p.dir, "ctrl")
		ready = p.ctrlPath
		args = append(args, "--ctrl", "type=unixio,path="+p.ctrlPath)
		p.ctrlArgs = []string{"--unix", p.ctrlPath}
	case unixBoth:
		sock := filepath.Join(p.dir, "tpm")
		p.ctrlPath = sock + ".ctrl"
		ready = sock
		args = append(args, "--server", "type=unixio,path="+sock, "--ctrl", "type=unixio,path="+p.ctrlPath)
		p.ctrlArgs = []string{"--unix", p.ctrlPath}
		p.tcti = "swtpm:path=" + sock
	}
	var env []string
	if im == ourVtpm {
		home := cfg.home
		if home == "" {
			home = filepath.Join(p.dir, "home")
		}
		env = append(env, "VTPM_HOME="+home)
	}
	p.Proc = testutil.Start(t, im.exe(t), env, ready, append(args, cfg.args...)...)
	if p.ctrlPath != "" && p.ctrlPath != ready {
		if err := p.WaitReady(p.ctrlPath, 10*time.Second); err != nil {
			t.Fatalf("%s: control socket: %v\n%s", im, err, p.Stderr)
		}
	}
	if cfg.transport == tcpDataUnixCtrl {
		port, _ := strconv.Atoi(p.tcti[strings.LastIndex(p.tcti, "=")+1:])
		bridge(t, port+1, p.ctrlPath)
	}
	return p
}

// bridge forwards TCP connections on 127.0.0.1:port to the unix socket path,
// one unix connection per TCP connection, as the swtpm TCTI makes one per
// control command.
func bridge(t *testing.T, port int, path string) {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatalf("control bridge: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("unix", path)
				if err != nil {
					return
				}
				defer u.Close()
				go func() {
					io.Copy(u, c)
					u.(*net.UnixConn).CloseWrite()
				}()
				io.Copy(c, u)
			}()
		}
	}()
}

// ioctl runs swtpm_ioctl against p and returns its combined output and exit code.
func (p *tpmProc) ioctl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	out, err := testutil.RunErr(nil, "swtpm_ioctl", append(append([]string{}, p.ctrlArgs...), args...)...)
	return out, exitCode(t, err)
}

// mustIoctl runs swtpm_ioctl and fails the test unless it succeeds.
func (p *tpmProc) mustIoctl(t *testing.T, args ...string) string {
	t.Helper()
	out, rc := p.ioctl(t, args...)
	if rc != 0 {
		t.Fatalf("%s: swtpm_ioctl %s: exit %d: %s\n%s log:\n%s", p.impl, strings.Join(args, " "), rc, out, p.impl, p.Stderr)
	}
	return out
}

func exitCode(t *testing.T, err error) int {
	t.Helper()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.ExitCode()
	}
	t.Fatalf("run: %v", err)
	return -1
}

// tpm2 runs a tpm2-tools command over the swtpm TCTI and fails the test on error.
func (p *tpmProc) tpm2(t *testing.T, tool string, args ...string) string {
	t.Helper()
	out, err := p.tpm2Err(tool, args...)
	if err != nil {
		t.Fatalf("%s: %s %s: %v\n%s\n%s log:\n%s", p.impl, tool, strings.Join(args, " "), err, out, p.impl, p.Stderr)
	}
	return out
}

func (p *tpmProc) tpm2Err(tool string, args ...string) (string, error) {
	return testutil.RunErr(nil, tool, append([]string{"-T", p.tcti}, args...)...)
}

// shutdown sends CMD_SHUTDOWN and checks that the process exits with 0.
func (p *tpmProc) shutdown(t *testing.T) {
	t.Helper()
	p.mustIoctl(t, "-s")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("%s did not exit 0 after swtpm_ioctl -s: %v\n%s", p.impl, err, p.Stderr)
	}
}

// The NV index and PCR the state tests write.
const (
	testNVIndex = "0x1500016"
	testPCR     = "16"
)

// writeMarks starts the TPM's OS side (TPM2_Startup), writes nv into an NV
// index and extends digest into PCR 16.
func (p *tpmProc) writeMarks(t *testing.T, nv []byte, digest [32]byte) {
	t.Helper()
	p.tpm2(t, "tpm2_startup", "-c")
	p.defineWriteNV(t, nv)
	p.tpm2(t, "tpm2_pcrextend", testPCR+":sha256="+hex.EncodeToString(digest[:]))
}

func (p *tpmProc) defineWriteNV(t *testing.T, nv []byte) {
	t.Helper()
	f := filepath.Join(p.dir, "nv.in")
	if err := os.WriteFile(f, nv, 0o600); err != nil {
		t.Fatal(err)
	}
	p.tpm2(t, "tpm2_nvdefine", testNVIndex, "-C", "o", "-s", strconv.Itoa(len(nv)), "-a", "ownerread|ownerwrite|authread|authwrite")
	p.tpm2(t, "tpm2_nvwrite", testNVIndex, "-C", "o", "-i", f)
}

// readNV returns the NV index's first n bytes.
func (p *tpmProc) readNV(t *testing.T, n int) []byte {
	t.Helper()
	f := filepath.Join(p.dir, "nv.out")
	p.tpm2(t, "tpm2_nvread", testNVIndex, "-C", "o", "-s", strconv.Itoa(n), "-o", f)
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readPCR returns PCR 16's sha256 value as tpm2_pcrread prints it.
func (p *tpmProc) readPCR(t *testing.T) string {
	t.Helper()
	out := p.tpm2(t, "tpm2_pcrread", "sha256:"+testPCR)
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), testPCR+": 0x"); ok {
			return strings.ToLower(v)
		}
	}
	t.Fatalf("%s: no PCR %s in tpm2_pcrread output:\n%s", p.impl, testPCR, out)
	return ""
}

// extendedPCR is a PCR's value after one extend of digest from all zeros.
func extendedPCR(digest [32]byte) string {
	sum := sha256.Sum256(append(make([]byte, 32), digest[:]...))
	return hex.EncodeToString(sum[:])
}

// ioctlStep is one swtpm_ioctl run: its arguments (FILE:x names a file in
// the process's scratch directory) and the exact output and exit code.
type ioctlStep struct {
	args []string
	want string
	rc   int
}

func buffersize(cur int) string {
	return fmt.Sprintf("TPM buffersize: %d\nminimum size  : 2808\nmaximum size  : 4096\n", cur)
}

const (
	infoSpec     = `{"TPMSpecification":{"family":"2.0","level":0,"revision":164}}`
	infoAttrs    = `{"TPMAttributes":{"manufacturer":"id:00001014","version":"id:20191023","model":"swtpm"}}`
	infoBoth     = `{"TPMSpecification":{"family":"2.0","level":0,"revision":164},"TPMAttributes":{"manufacturer":"id:00001014","version":"id:20191023","model":"swtpm"}}`
	infoFeatures = `{"TPMFeatures":{"RSAKeySizes":[1024,2048,3072],"CamelliaKeySizes":[128,256]}}`
	badLocality  = "Locality outside valid range of [0..4].\n"
)

func notRunning(what string) string { return "TPM result from PTM_" + what + ": 0xa\n" }

// ioctlSequence exercises every swtpm_ioctl option on a TPM that starts
// stopped, in an order where each answer depends on the ones before.
var ioctlSequence = []ioctlStep{
	// Stopped: what works without a running TPM.
	{args: []string{"-c"}, want: "ptm capability is 0xffff\n"},
	{args: []string{"-g"}, want: "ptm configuration flags: 0x2\n"}, // both run with --migration-key
	{args: []string{"-e"}, want: notRunning("GET_TPMESTABLISHED"), rc: 1},
	{args: []string{"-b", "0"}, want: buffersize(4096)},
	{args: []string{"-b", "3000"}, want: buffersize(3000)},
	{args: []string{"-b", "100000"}, want: buffersize(4096)},
	{args: []string{"-b", "1"}, want: buffersize(2808)},
	{args: []string{"--info", "1"}, want: infoSpec + "\n"},
	{args: []string{"-l", "0"}},
	{args: []string{"-l", "4"}},
	{args: []string{"-l", "5"}, want: badLocality, rc: 1},
	{args: []string{"-C"}, want: notRunning("CANCEL_TPM_CMD"), rc: 1},
	{args: []string{"-v"}, want: notRunning("STORE_VOLATILE"), rc: 1},
	{args: []string{"-h", "data"}, want: notRunning("HASH_START"), rc: 1},
	{args: []string{"-r", "3"}, want: notRunning("RESET_TPMESTABLISHED"), rc: 1},
	{args: []string{"--save", "permanent", "FILE:stopped"}, want: notRunning("GET_STATEBLOB"), rc: 1},
	{args: []string{"--stop"}},
	// Running.
	{args: []string{"-i"}},
	{args: []string{"-e"}, want: "tpmEstablished is 0\n"},
	{args: []string{"-b", "0"}, want: buffersize(2808)},
	{args: []string{"-b", "4096"}, want: notRunning("SET_BUFFERSIZE"), rc: 1},
	{args: []string{"--info", "1"}, want: infoSpec + "\n"},
	{args: []string{"--info", "2"}, want: infoAttrs + "\n"},
	{args: []string{"--info", "3"}, want: infoBoth + "\n"},
	{args: []string{"--info", "4"}, want: infoFeatures + "\n"},
	{args: []string{"--info", "0"}, want: "{}\n"},
	{args: []string{"-l", "0"}},
	{args: []string{"-l", "1"}},
	{args: []string{"-l", "2"}},
	{args: []string{"-l", "3"}},
	{args: []string{"-l", "4"}},
	{args: []string{"-l", "5"}, want: badLocality, rc: 1},
	{args: []string{"-r", "0"}, want: "TPM result from PTM_RESET_TPMESTABLISHED: 0x3d\n", rc: 1},
	{args: []string{"-r", "5"}, want: badLocality, rc: 1},
	{args: []string{"-h", "measured data"}},
	{args: []string{"-e"}, want: "tpmEstablished is 1\n"},
	{args: []string{"-r", "3"}},
	{args: []string{"-e"}, want: "tpmEstablished is 0\n"},
	{args: []string{"-h", strings.Repeat("0123456789", 1000)}}, // more than one 4 KiB chunk
	{args: []string{"-e"}, want: "tpmEstablished is 1\n"},
	{args: []string{"-r", "4"}},
	{args: []string{"-e"}, want: "tpmEstablished is 0\n"},
	{args: []string{"-C"}},
	{args: []string{"-v"}},
	{args: []string{"--save", "savestate", "FILE:savestate"}}, // TPM 2 has none: 0x800, non-fatal
	{args: []string{"--load", "permanent", "FILE:savestate"}, want: notRunning("SET_STATEBLOB"), rc: 1},
	{args: []string{"--stop"}},
	{args: []string{"-e"}, want: notRunning("GET_TPMESTABLISHED"), rc: 1},
	{args: []string{"-b", "3968"}, want: buffersize(3968)},
	{args: []string{"-i"}},
	{args: []string{"-b", "0"}, want: buffersize(3968)},
	{args: []string{"-c"}, want: "ptm capability is 0xffff\n"},
}

// TestSwtpmIoctlMatchesSwtpm runs every swtpm_ioctl option against vtpm and
// the real swtpm side by side; both must give the expected output and exit
// code at every step, and both must exit 0 on -s.
func TestSwtpmIoctlMatchesSwtpm(t *testing.T) {
	t.Parallel()
	needTools(t)
	// The same explicit migration key on both: a sealed vtpm otherwise
	// derives one from its data key, and swtpm has none.
	migArgs := hexKey.args(t, shortDir(t), "--migration-key")
	procs := make([]*tpmProc, len(impls))
	for i, im := range impls {
		procs[i] = startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, args: migArgs})
	}
	for n, step := range ioctlSequence {
		for _, p := range procs {
			args := make([]string, len(step.args))
			for i, a := range step.args {
				if name, ok := strings.CutPrefix(a, "FILE:"); ok {
					a = filepath.Join(p.dir, name)
				}
				args[i] = a
			}
			out, rc := p.ioctl(t, args...)
			if out != step.want || rc != step.rc {
				t.Fatalf("step %d, %s: swtpm_ioctl %.40s: got exit %d, output %q; want exit %d, output %q\n%s log:\n%s",
					n, p.impl, strings.Join(step.args, " "), rc, out, step.rc, step.want, p.impl, p.Stderr)
			}
		}
	}
	for _, p := range procs {
		// -v stored the volatile state; -i resumed from it and deleted it.
		if st, err := os.ReadDir(p.stateDir); err != nil {
			t.Fatal(err)
		} else {
			for _, e := range st {
				if strings.Contains(e.Name(), "volatilestate") {
					t.Errorf("%s: %s is still in the state directory after -i", p.impl, e.Name())
				}
			}
		}
		if fi, err := os.Stat(filepath.Join(p.dir, "savestate")); err != nil || fi.Size() != 0 {
			t.Errorf("%s: --save savestate: want an empty file, got %v, %v", p.impl, fi, err)
		}
		p.shutdown(t)
	}
}

// TestSwtpmIoctlSaveLoad saves the permanent, volatile and savestate blobs
// of a TPM that has an NV index and an extended PCR, loads them into a
// stopped fresh TPM of the same implementation, and after -i the TPM
// carries on where the first one stopped: same NV contents, same PCR.
func TestSwtpmIoctlSaveLoad(t *testing.T) {
	t.Parallel()
	needTools(t)
	nv := []byte("state survives save and load...!")
	digest := sha256.Sum256([]byte("measurement"))
	wantPCR := extendedPCR(digest)

	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			// Two TPMs share state only through a shared migration key (a
			// sealed vtpm's own is derived from its data key).
			migArgs := hexKey.args(t, shortDir(t), "--migration-key")
			src := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, args: migArgs})
			src.mustIoctl(t, "-i")
			src.writeMarks(t, nv, digest)
			if got := src.readPCR(t); got != wantPCR {
				t.Fatalf("PCR %s after extend: %s, want %s", testPCR, got, wantPCR)
			}
			blobs := map[string]string{}
			for _, typ := range []string{"permanent", "volatile", "savestate"} {
				blobs[typ] = filepath.Join(src.dir, typ+".blob")
				src.mustIoctl(t, "--save", typ, blobs[typ])
			}
			src.shutdown(t)

			dst := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, args: migArgs})
			// Loading needs a stopped TPM, so a running one refuses.
			dst.mustIoctl(t, "-i")
			if out, rc := dst.ioctl(t, "--load", "permanent", blobs["permanent"]); rc != 1 || out != notRunning("SET_STATEBLOB") {
				t.Fatalf("--load while running: exit %d, %q; want exit 1, %q", rc, out, notRunning("SET_STATEBLOB"))
			}
			dst.mustIoctl(t, "--stop")
			for _, typ := range []string{"permanent", "volatile", "savestate"} {
				dst.mustIoctl(t, "--load", typ, blobs[typ])
			}
			dst.mustIoctl(t, "-i")
			// Resumed from the volatile state: already started, PCRs kept.
			if got := dst.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("NV after --load and -i: %q, want %q", got, nv)
			}
			if got := dst.readPCR(t); got != wantPCR {
				t.Errorf("PCR %s after --load and -i: %s, want %s", testPCR, got, wantPCR)
			}
			dst.shutdown(t)

			// The loaded state reached the disk: a restart has the NV index.
			again := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, stateDir: dst.stateDir, home: filepath.Join(dst.dir, "home")})
			again.mustIoctl(t, "-i")
			again.tpm2(t, "tpm2_startup", "-c")
			if got := again.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("NV after restart: %q, want %q", got, nv)
			}
			again.shutdown(t)
		})
	}
}

// wireStep is one raw control-channel exchange: the request (hex, spaces
// ignored) and the exact reply.
type wireStep struct {
	name string
	req  string
	want []byte
}

// dialCtrl connects to a unix control socket. swtpm serves one client at a
// time with a backlog of 1, so a non-blocking connect (Go's) can find the
// backlog still holding the readiness probe's connection: it retries then.
func dialCtrl(t *testing.T, path string) *net.UnixConn {
	t.Helper()
	for range 1000 {
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err == nil {
			c.SetDeadline(time.Now().Add(30 * time.Second))
			t.Cleanup(func() { c.Close() })
			return c
		}
		if !errors.Is(err, syscall.EAGAIN) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: backlog stays full", path)
	return nil
}

func unhex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

func withData(h string, data string) []byte { return append(unhex(h), data...) }

// wireSequence is §1.7's live capture of swtpm 0.7.1's control channel,
// extended with the other commands' replies.
var wireSequence = []wireStep{
	{"GET_CAPABILITY stopped", "00000001", unhex("00000000 0000ffff")},
	{"GET_CONFIG", "0000000f", unhex("00000000 00000000")},
	{"SET_BUFFERSIZE query", "00000011 00000000", unhex("00000000 00001000 00000af8 00001000")},
	{"GET_TPMESTABLISHED stopped", "00000004", unhex("0000000a")},
	{"GET_STATEBLOB stopped", "0000000c 00000001 00000001 00000000", unhex("0000000a")},
	{"CANCEL stopped", "00000009", unhex("0000000a")},
	{"SET_LOCALITY 1-byte body (tcti-swtpm)", "00000005 00", unhex("00000000")},
	{"SET_LOCALITY 4-byte body (QEMU)", "00000005 00000000", unhex("00000000")},
	{"INIT", "00000002 00000000", unhex("00000000")},
	{"GET_TPMESTABLISHED", "00000004", unhex("00000000 00000000")},
	{"SET_BUFFERSIZE running", "00000011 00001000", unhex("0000000a")},
	{"SET_BUFFERSIZE query running", "00000011 00000000", unhex("00000000 00001000 00000af8 00001000")},
	{"GET_INFO 3", "00000012 0000000000000003 00000000 00000000",
		withData("00000000 00000096 00000096", infoBoth+"\x00")},
	{"GET_INFO 4", "00000012 0000000000000004 00000000 00000000",
		withData("00000000 0000004e 0000004e", infoFeatures+"\x00")},
	{"GET_INFO 1 offset 40", "00000012 0000000000000001 00000028 00000000",
		withData("00000000 0000003f 00000017", infoSpec[40:]+"\x00")},
	{"GET_INFO offset past end", "00000012 0000000000000001 00000100 00000000", unhex("00000003")},
	{"SET_LOCALITY 5", "00000005 05000000", unhex("0000003d")},
	{"RESET_TPMESTABLISHED loc 0", "0000000b 00000000", unhex("0000003d")},
	{"RESET_TPMESTABLISHED loc 3", "0000000b 03000000", unhex("00000000")},
	{"RESET_TPMESTABLISHED loc 5", "0000000b 05000000", unhex("0000003d")},
	{"HASH_START", "00000006", unhex("00000000")},
	{"HASH_DATA", "00000007 00000004 61626364", unhex("00000000")},
	{"HASH_END", "00000008", unhex("00000000")},
	{"GET_TPMESTABLISHED after hash", "00000004", unhex("00000000 01000000")},
	{"CANCEL", "00000009", unhex("00000000")},
	{"STORE_VOLATILE", "0000000a", unhex("00000000")},
	{"unknown command 0x77", "00000077", unhex("0000000a")},
	{"unknown command 0x13 (LOCK_STORAGE is 0.8)", "00000013 00000000", unhex("0000000a")},
	{"GET_STATEBLOB savestate", "0000000c 00000001 00000003 00000000", unhex("00000800 00000000 00000000 00000000")},
	{"SET_STATEBLOB while running", "0000000d 00000000 00000001 00000000", unhex("0000000a")},
	{"SET_DATAFD with --server given", "00000010", unhex("0000001f")},
	{"STOP", "0000000e", unhex("00000000")},
	{"STOP again", "0000000e", unhex("00000000")},
	{"SET_STATEBLOB empty while stopped", "0000000d 00000000 00000001 00000000", unhex("00000000")},
	{"SET_BUFFERSIZE stopped", "00000011 00000f80", unhex("00000000 00000f80 00000af8 00001000")},
	{"SET_BUFFERSIZE stopped clamps", "00000011 000186a0", unhex("00000000 00001000 00000af8 00001000")},
	{"GET_CAPABILITY", "00000001", unhex("00000000 0000ffff")},
}

// TestCtrlWireBytes replays the control-channel capture against vtpm and the
// real swtpm on one connection each, checking every reply byte for byte.
// After each reply a GET_CAPABILITY must answer exactly its 8 bytes, which
// proves the reply before it had no bytes beyond the expected ones.
func TestCtrlWireBytes(t *testing.T) {
	t.Parallel()
	needTools(t)
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			p := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl})
			c := dialCtrl(t, p.ctrlPath)
			exchange := func(name string, req, want []byte) {
				t.Helper()
				if _, err := c.Write(req); err != nil {
					t.Fatalf("%s: write: %v", name, err)
				}
				got := make([]byte, len(want))
				if _, err := io.ReadFull(c, got); err != nil {
					t.Fatalf("%s: read %d reply bytes: %v (got % x)", name, len(want), err, got)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("%s: reply\n% x\nwant\n% x", name, got, want)
				}
			}
			probe := unhex("00000001")
			capReply := unhex("00000000 0000ffff")
			for _, s := range wireSequence {
				want := s.want
				if s.name == "GET_CONFIG" && im == ourVtpm {
					// Sealed state has a migration key derived from its data key.
					want = unhex("00000000 00000002")
				}
				exchange(s.name, unhex(s.req), want)
				exchange(s.name+": following GET_CAPABILITY", probe, capReply)
			}
			exchange("SHUTDOWN", unhex("00000003"), unhex("00000000"))
			if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
				t.Errorf("after SHUTDOWN: read %d bytes, %v; want EOF", n, err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := p.Wait(ctx); err != nil {
				t.Errorf("after SHUTDOWN: %v, want exit 0\n%s", err, p.Stderr)
			}
		})
	}
}

// TestSetDataFD passes data channels over the control socket as QEMU does:
// a request without a descriptor is refused, the first descriptor becomes
// the data channel, a second one is refused while the first is in use.
func TestSetDataFD(t *testing.T) {
	t.Parallel()
	needTools(t)
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			p := startTPM(t, im, tpmConfig{transport: ctrlOnly})
			c := dialCtrl(t, p.ctrlPath)
			setDataFD := func(f *os.File) []byte {
				t.Helper()
				var oob []byte
				if f != nil {
					oob = syscall.UnixRights(int(f.Fd()))
				}
				if _, _, err := c.WriteMsgUnix(unhex("00000010"), oob, nil); err != nil {
					t.Fatal(err)
				}
				rsp := make([]byte, 4)
				if _, err := io.ReadFull(c, rsp); err != nil {
					t.Fatal(err)
				}
				return rsp
			}
			if got := setDataFD(nil); !bytes.Equal(got, unhex("00000003")) {
				t.Errorf("SET_DATAFD without a descriptor: % x, want 00 00 00 03", got)
			}
			data := socketpair(t)
			if got := setDataFD(data[1]); !bytes.Equal(got, unhex("00000000")) {
				t.Fatalf("SET_DATAFD: % x, want 00 00 00 00", got)
			}
			data[1].Close()
			other := socketpair(t)
			if got := setDataFD(other[1]); !bytes.Equal(got, unhex("0000001f")) {
				t.Errorf("second SET_DATAFD: % x, want 00 00 00 1f", got)
			}
			// The passed socket is the data channel: QEMU's TPM version
			// probe gets TPM 2.0's "not initialized" answer.
			readClock := unhex("8001 0000000a 00000181")
			if _, err := data[0].Write(readClock); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 10)
			data[0].SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := io.ReadFull(data[0], got); err != nil {
				t.Fatal(err)
			}
			if want := unhex("8001 0000000a 00000101"); !bytes.Equal(got, want) {
				t.Errorf("ReadClock before INIT: % x, want % x", got, want)
			}
		})
	}
}

// socketpair returns both ends of a connected unix stream socket pair.
func socketpair(t *testing.T) [2]*os.File {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := [2]*os.File{os.NewFile(uintptr(fds[0]), "data0"), os.NewFile(uintptr(fds[1]), "data1")}
	t.Cleanup(func() { f[0].Close(); f[1].Close() })
	return f
}

// TestLoadEmptyVolatileBlob: swtpm_ioctl --load volatile of an empty file
// makes swtpm forget only the volatile state; the permanent state loaded
// before it stays and is what the TPM starts with.
func TestLoadEmptyVolatileBlob(t *testing.T) {
	t.Parallel()
	needTools(t)
	nv := []byte("kept without volatile state")
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			// A shared migration key: a sealed vtpm's own is derived from its data key.
			migArgs := hexKey.args(t, shortDir(t), "--migration-key")
			src := startTPM(t, im, tpmConfig{transport: unixBoth, args: migArgs})
			src.mustIoctl(t, "-i")
			src.tpm2(t, "tpm2_startup", "-c")
			src.defineWriteNV(t, nv)
			perm, vol, empty := filepath.Join(src.dir, "perm"), filepath.Join(src.dir, "vol"), filepath.Join(src.dir, "empty")
			src.mustIoctl(t, "--save", "permanent", perm)
			src.mustIoctl(t, "--save", "volatile", vol)
			src.shutdown(t)
			if err := os.WriteFile(empty, nil, 0o600); err != nil {
				t.Fatal(err)
			}

			dst := startTPM(t, im, tpmConfig{transport: unixBoth, args: migArgs})
			dst.mustIoctl(t, "--load", "permanent", perm)
			dst.mustIoctl(t, "--load", "volatile", vol)
			dst.mustIoctl(t, "--load", "volatile", empty)
			dst.mustIoctl(t, "-i")
			dst.tpm2(t, "tpm2_startup", "-c") // no volatile state: not resumed
			if got := dst.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("NV: %q, want %q", got, nv)
			}
			dst.shutdown(t)
		})
	}
}
