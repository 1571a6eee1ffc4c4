package instance_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/uuid"

	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/seal"
	"vtpm/internal/testutil"
)

// This file holds the crash-safety test and the helpers it shares with
// tamper_test.go: a vtpm process on TCP ports, a go-tpm transport over its
// data channel, a control-channel client, and an 8-byte NV counter.

// procBound bounds how long a vtpm process may take to come up, answer or
// exit; it only turns a hang into a failure and is never a measurement.
const procBound = 30 * time.Second

// vtpmProc is one `vtpm swtpm socket` process serving on TCP ports.
type vtpmProc struct {
	cmd    *exec.Cmd
	stderr bytes.Buffer // read only after the process has exited
	data   string       // host:port of the data channel
	ctrl   string       // host:port of the control channel
	done   chan struct{}
	err    error
}

// startVTPM starts vtpm on a fresh pair of ports with the data root home and
// the state directory dir. It does not wait for the TPM to be ready.
func startVTPM(t testing.TB, home, dir string, extra ...string) *vtpmProc {
	t.Helper()
	port := testutil.FreePorts(t, 2)
	p := &vtpmProc{
		data: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		ctrl: net.JoinHostPort("127.0.0.1", strconv.Itoa(port+1)),
		done: make(chan struct{}),
	}
	args := append([]string{
		"swtpm", "socket", "--tpm2",
		"--tpmstate", "dir=" + dir,
		"--server", fmt.Sprintf("type=tcp,port=%d", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d", port+1),
		"--flags", "not-need-init,startup-clear",
	}, extra...)
	p.cmd = exec.Command(testutil.Binary(t), args...)
	p.cmd.Env = append(os.Environ(), "VTPM_HOME="+home)
	p.cmd.Stdout = &p.stderr
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

// wait waits for the process to exit and returns its exit code (-1 when a
// signal ended it) and everything it wrote.
func (p *vtpmProc) wait(t testing.TB) (int, string) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(procBound):
		p.cmd.Process.Kill()
		<-p.done
		t.Fatalf("vtpm did not exit within %v; output:\n%s", procBound, p.stderr.String())
	}
	return p.cmd.ProcessState.ExitCode(), p.stderr.String()
}

// dial connects to the data channel, retrying until the listener exists.
func (p *vtpmProc) dial(t testing.TB) (*tpmConn, error) {
	t.Helper()
	deadline := time.Now().Add(procBound)
	for {
		c, err := net.Dial("tcp", p.data)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return &tpmConn{c: c}, nil
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("vtpm exited before its data channel accepted a connection: %v", p.err)
		default:
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("data channel %s: %w", p.data, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// ctrlCmd sends one body-less control command and returns its result code.
func (p *vtpmProc) ctrlCmd(cmd uint32) (uint32, error) {
	c, err := net.Dial("tcp", p.ctrl)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(procBound))
	if _, err := c.Write(binary.BigEndian.AppendUint32(nil, cmd)); err != nil {
		return 0, err
	}
	var rsp [4]byte
	if _, err := io.ReadFull(c, rsp[:]); err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(rsp[:]), nil
}

const (
	cmdShutdown      = 0x03
	cmdStoreVolatile = 0x0A
)

// shutdown stores the volatile state and shuts vtpm down over the control
// channel, then checks that it exited cleanly. It returns its output.
func (p *vtpmProc) shutdown(t testing.TB) string {
	t.Helper()
	for _, cmd := range []uint32{cmdStoreVolatile, cmdShutdown} {
		if rc, err := p.ctrlCmd(cmd); err != nil || rc != 0 {
			p.cmd.Process.Kill()
			_, out := p.wait(t)
			t.Fatalf("control command 0x%02x: result 0x%x, %v; output:\n%s", cmd, rc, err, out)
		}
	}
	code, out := p.wait(t)
	if code != 0 {
		t.Fatalf("vtpm exited with %d after CMD_SHUTDOWN; output:\n%s", code, out)
	}
	return out
}

// tpmConn is a go-tpm transport over vtpm's raw data channel.
type tpmConn struct{ c net.Conn }

func (tc *tpmConn) Send(cmd []byte) ([]byte, error) {
	tc.c.SetDeadline(time.Now().Add(procBound))
	if _, err := tc.c.Write(cmd); err != nil {
		return nil, err
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(tc.c, hdr); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[2:])
	if n < 10 || n > 4096 {
		return nil, fmt.Errorf("TPM response size %d", n)
	}
	rsp := make([]byte, n)
	copy(rsp, hdr)
	if _, err := io.ReadFull(tc.c, rsp[10:]); err != nil {
		return nil, err
	}
	return rsp, nil
}

// The NV counter: an ordinary 8-byte index, authorised by its empty password.
const counterIndex = tpm2.TPMHandle(0x01500020)

func counterPublic() tpm2.TPMSNVPublic {
	return tpm2.TPMSNVPublic{
		NVIndex: counterIndex,
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			OwnerWrite: true, OwnerRead: true, AuthWrite: true, AuthRead: true,
			NoDA: true, NT: tpm2.TPMNTOrdinary,
		},
		DataSize: 8,
	}
}

func counterAuth() tpm2.AuthHandle {
	pub := counterPublic()
	name, err := tpm2.NVName(&pub)
	if err != nil {
		panic(err) // a constant template always has a name
	}
	return tpm2.AuthHandle{Handle: counterIndex, Name: *name, Auth: tpm2.PasswordAuth(nil)}
}

func defineCounter(tpm *tpmConn) error {
	_, err := tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(counterPublic()),
	}.Execute(tpm)
	return err
}

func writeCounter(tpm *tpmConn, v uint64) error {
	h := counterAuth()
	_, err := tpm2.NVWrite{
		AuthHandle: h,
		NVIndex:    tpm2.NamedHandle{Handle: h.Handle, Name: h.Name},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: binary.BigEndian.AppendUint64(nil, v)},
	}.Execute(tpm)
	return err
}

func readCounter(tpm *tpmConn) (uint64, error) {
	h := counterAuth()
	rsp, err := tpm2.NVRead{
		AuthHandle: h,
		NVIndex:    tpm2.NamedHandle{Handle: h.Handle, Name: h.Name},
		Size:       8,
	}.Execute(tpm)
	if err != nil {
		return 0, err
	}
	if len(rsp.Data.Buffer) != 8 {
		return 0, fmt.Errorf("NV_Read returned %d bytes, want 8", len(rsp.Data.Buffer))
	}
	return binary.BigEndian.Uint64(rsp.Data.Buffer), nil
}

// tpmKeys opens the host keystore under home the way vtpm does and returns
// the data key of the TPM in dir (from its key protector) and the host's
// record of the generations it has seen. Reading them takes no lock.
func tpmKeys(t testing.TB, home, dir string) (*keybroker.Key, seal.Generations) {
	t.Helper()
	h, err := keybroker.Open(home, keystore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	o, err := h.OpenTPM(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(o.Close)
	return o.Key, h.Generations()
}

// tpmUUID reads the TPM UUID that every sealed blob in dir is bound to.
func tpmUUID(t testing.TB, dir string) uuid.UUID {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(dir, seal.StateFileName))
	if err != nil {
		t.Fatal(err)
	}
	var sf struct{ UUID string }
	if err := json.Unmarshal(raw, &sf); err != nil {
		t.Fatalf("%s: %v", seal.StateFileName, err)
	}
	id, err := uuid.Parse(sf.UUID)
	if err != nil {
		t.Fatalf("%s: %v", seal.StateFileName, err)
	}
	return id
}

// unsealFile verifies one sealed file of TPM id; a missing file is
// reported as such.
func unsealFile(key *keybroker.Key, id uuid.UUID, name, path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	if key.TPM() != id {
		return 0, fmt.Errorf("the key is TPM %s's, not TPM %s's", key.TPM(), id)
	}
	plain, gen, err := key.Unseal(name, b)
	clear(plain)
	return gen, err
}

// crashSeed returns the seed for the random kill delays: VTPM_CRASH_SEED to
// replay a failure, otherwise a fresh one.
func crashSeed(t *testing.T) uint64 {
	if s := os.Getenv("VTPM_CRASH_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("VTPM_CRASH_SEED=%q: %v", s, err)
		}
		return seed
	}
	return uint64(time.Now().UnixNano())
}

// TestCrashSafety kills vtpm with SIGKILL at random moments while a client
// increments an NV counter, and checks after every kill that the sealed state
// still verifies and that the restarted TPM serves the last acknowledged
// value or the one that was in flight.
func TestCrashSafety(t *testing.T) {
	kills := 300
	if testing.Short() {
		kills = 40
	}
	seed := crashSeed(t)
	t.Logf("seed %d (replay with VTPM_CRASH_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))

	home, dir := t.TempDir(), filepath.Join(t.TempDir(), "tpm")

	// Manufacture the TPM and define the counter, without interference.
	p := startVTPM(t, home, dir)
	tpm, err := p.dial(t)
	if err != nil {
		t.Fatal(err)
	}
	if err := defineCounter(tpm); err != nil {
		t.Fatalf("NV_DefineSpace: %v", err)
	}
	if err := writeCounter(tpm, 0); err != nil {
		t.Fatalf("NV_Write: %v", err)
	}
	p.shutdown(t)
	key, gens := tpmKeys(t, home, dir)
	id := tpmUUID(t, dir)

	var (
		acked    uint64 // the last value whose NV_Write was answered
		inFlight uint64 // the last value sent (acked or acked+1)
		newest   uint64 // newest generation of permall on disk after the last kill
		reads    int    // restarts whose value was checked
		writes   int    // NV_Writes acknowledged while waiting to be killed
	)
	for k := range kills {
		// A quarter of the kills land while the TPM starts (TPM2_Startup
		// writes NV too); the rest while the counter is being written.
		duringStartup := rng.IntN(4) == 0
		delay := time.Duration(rng.Int64N(int64(20*time.Millisecond) + 1))
		what := fmt.Sprintf("kill %d (after %v, during start-up %v)", k, delay, duringStartup)

		p := startVTPM(t, home, dir)
		var killed, exitedFirst atomic.Bool
		fired := make(chan struct{})
		kill := func() {
			killed.Store(true)
			if err := p.cmd.Process.Signal(syscall.SIGKILL); errors.Is(err, os.ErrProcessDone) {
				exitedFirst.Store(true)
			}
			close(fired)
		}
		var timer *time.Timer
		if duringStartup {
			timer = time.AfterFunc(delay, kill)
		}
		failed := func(format string, args ...any) {
			if timer != nil {
				timer.Stop()
			}
			p.cmd.Process.Kill()
			_, out := p.wait(t)
			t.Fatalf("%s: %s\nvtpm output:\n%s", what, fmt.Sprintf(format, args...), out)
		}

		tpm, err := p.dial(t)
		var v uint64
		if err == nil {
			v, err = readCounter(tpm)
		}
		switch {
		case err == nil:
			if v != acked && v != inFlight {
				failed("restarted TPM serves counter %d, want the acknowledged %d or the in-flight %d", v, acked, inFlight)
			}
			acked, inFlight = v, v
			reads++
		case !killed.Load():
			failed("restart: reading the counter: %v", err)
		}
		if err == nil {
			if timer == nil {
				timer = time.AfterFunc(delay, kill)
			}
			for i := acked + 1; ; i++ {
				inFlight = i
				if err := writeCounter(tpm, i); err != nil {
					if !killed.Load() {
						failed("NV_Write(%d): %v", i, err)
					}
					break
				}
				acked = i
				writes++
			}
		}
		<-fired
		if tpm != nil {
			tpm.c.Close()
		}
		p.wait(t)
		if exitedFirst.Load() || !p.cmd.ProcessState.Sys().(syscall.WaitStatus).Signaled() {
			t.Fatalf("%s: vtpm exited on its own (%v) before it was killed; output:\n%s", what, p.err, p.stderr.String())
		}

		newest = checkSealedAfterKill(t, what, dir, key, id, gens, newest)
	}
	t.Logf("%d kills, %d restarts checked, %d NV writes acknowledged, counter at %d", kills, reads, writes, acked)

	// The state left by the last kill starts and serves a value it may.
	p = startVTPM(t, home, dir)
	tpm, err = p.dial(t)
	if err != nil {
		t.Fatal(err)
	}
	v, err := readCounter(tpm)
	if err != nil {
		p.cmd.Process.Kill()
		_, out := p.wait(t)
		t.Fatalf("final restart: reading the counter: %v; output:\n%s", err, out)
	}
	if v != acked && v != inFlight {
		t.Errorf("final restart serves counter %d, want %d or %d", v, acked, inFlight)
	}
	p.shutdown(t)
}

// permallSlots are the two files vtpm writes permall into, alternately and
// in place.
var permallSlots = []string{"permall.a.sealed", "permall.b.sealed"}

// checkSealedAfterKill asserts what a killed vtpm must leave behind: at
// least one permall slot verifies; at most one does not (the slot being
// written when the kill came, which holds a torn copy); two verifiable
// slots hold different generations; the newest generation never goes back;
// and the record of the last generation seen never runs ahead of what is on
// disk (which would make the next start report a rollback). It returns the
// newest generation on disk.
func checkSealedAfterKill(t *testing.T, what, dir string, key *keybroker.Key, id uuid.UUID, gens seal.Generations, before uint64) uint64 {
	t.Helper()
	var (
		newest, verified uint64
		gensOK           []uint64
		failures         []string
	)
	for _, n := range permallSlots {
		gen, err := unsealFile(key, id, "permall", filepath.Join(dir, n))
		switch {
		case errors.Is(err, os.ErrNotExist) && before > 1:
			// Two writes create both slots, and nothing removes them.
			t.Fatalf("%s: %s is missing", what, n)
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			failures = append(failures, fmt.Sprintf("%s: %v", n, err))
		default:
			gensOK = append(gensOK, gen)
			newest = max(newest, gen)
			verified++
		}
	}
	if verified == 0 {
		t.Fatalf("%s: no verifiable copy of permall is left: %v", what, failures)
	}
	if len(failures) > 1 {
		t.Fatalf("%s: more than one slot is torn: %v", what, failures)
	}
	if len(gensOK) == 2 && gensOK[0] == gensOK[1] {
		t.Fatalf("%s: both slots hold generation %d; a write must go to the slot without the newest copy", what, gensOK[0])
	}
	if newest < before {
		t.Fatalf("%s: permall went back from generation %d to %d", what, before, newest)
	}
	last, err := gens.Last(id, "permall")
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if last > newest {
		t.Fatalf("%s: generation %d is recorded as seen, but the newest copy on disk is %d", what, last, newest)
	}
	return newest
}
