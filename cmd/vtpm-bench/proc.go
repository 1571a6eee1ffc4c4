package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// impl is one TPM implementation under test. Both are run as
// "<argv…> socket <options>" with identical options.
type impl struct {
	name string   // "swtpm" or "vtpm"
	argv []string // the command up to and including "socket"
	env  []string // added to the environment
}

// procOpts are the options given to both implementations.
type procOpts struct {
	stateDir string
	ctrlPath string   // --ctrl type=unixio,path=
	dataPort int      // --server type=tcp,port= on 127.0.0.1; 0 for none (as QEMU runs it)
	extra    []string // further options, for one implementation only
}

func (o procOpts) args() []string {
	a := []string{
		"--tpm2",
		"--tpmstate", "dir=" + o.stateDir,
		"--ctrl", "type=unixio,path=" + o.ctrlPath,
	}
	if o.dataPort != 0 {
		a = append(a, "--server", "type=tcp,port="+strconv.Itoa(o.dataPort)+",bindaddr=127.0.0.1")
	}
	return append(a, o.extra...)
}

// proc is a running TPM process and its control connection.
type proc struct {
	impl   *impl
	opts   procOpts
	cmd    *exec.Cmd
	stderr bytes.Buffer // read only after the process has exited
	done   chan struct{}
	err    error
	ctrl   net.Conn
}

// spawn starts a TPM process; it does not wait for it to serve.
func spawn(im *impl, o procOpts) (*proc, error) {
	argv := append(append([]string(nil), im.argv...), o.args()...)
	p := &proc{impl: im, opts: o, done: make(chan struct{})}
	p.cmd = exec.Command(argv[0], argv[1:]...)
	p.cmd.Env = append(os.Environ(), im.env...)
	// Do not leave TPMs behind when the benchmark is interrupted.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.cmd.Stdout = &p.stderr
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", im.name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// failed describes a process that did not do what was asked, with its output.
func (p *proc) failed(what string, err error) error {
	if !p.exited() {
		p.kill()
	}
	return fmt.Errorf("%s: %s: %w (process: %v; output: %q)", p.impl.name, what, err, p.err, bytes.TrimSpace(p.stderr.Bytes()))
}

// connectCtrl polls the control socket until it accepts a connection.
func (p *proc) connectCtrl(poll, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.Dial("unix", p.opts.ctrlPath)
		if err == nil {
			p.ctrl = c
			return nil
		}
		if p.exited() {
			return p.failed("connect to the control socket", errors.New("process exited"))
		}
		if time.Now().After(deadline) {
			return p.failed("connect to the control socket", err)
		}
		time.Sleep(poll)
	}
}

// Control-channel commands of swtpm's ioctl interface (big-endian u32s).
const (
	ctrlGetCapability = 0x01
	ctrlInit          = 0x02
	ctrlShutdown      = 0x03
	ctrlGetStateBlob  = 0x0C
	ctrlSetStateBlob  = 0x0D

	blobPermanent = 1
)

// ctrlCall sends a control command and reads a fixed-size answer.
func (p *proc) ctrlCall(req []byte, rspLen int) ([]byte, error) {
	if p.ctrl == nil {
		return nil, errors.New("no control connection")
	}
	p.ctrl.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := p.ctrl.Write(req); err != nil {
		return nil, fmt.Errorf("write control command: %w", err)
	}
	rsp := make([]byte, rspLen)
	if _, err := io.ReadFull(p.ctrl, rsp); err != nil {
		return nil, fmt.Errorf("read control response: %w", err)
	}
	return rsp, nil
}

func u32s(v ...uint32) []byte {
	b := make([]byte, 0, 4*len(v))
	for _, x := range v {
		b = binary.BigEndian.AppendUint32(b, x)
	}
	return b
}

// resultOnly runs a control command answered by a bare result code.
func (p *proc) resultOnly(name string, req []byte) error {
	rsp, err := p.ctrlCall(req, 4)
	if err != nil {
		return p.failed(name, err)
	}
	if rc := binary.BigEndian.Uint32(rsp); rc != 0 {
		return p.failed(name, fmt.Errorf("result 0x%x", rc))
	}
	return nil
}

func (p *proc) getCapability() error {
	if _, err := p.ctrlCall(u32s(ctrlGetCapability), 8); err != nil {
		return p.failed("CMD_GET_CAPABILITY", err)
	}
	return nil
}

func (p *proc) init() error { return p.resultOnly("CMD_INIT", u32s(ctrlInit, 0)) }

// getPermanent fetches the permanent state blob (unencrypted: no --key).
func (p *proc) getPermanent() (flags uint32, blob []byte, err error) {
	for {
		hdr, err := p.ctrlCall(u32s(ctrlGetStateBlob, 0, blobPermanent, uint32(len(blob))), 16)
		if err != nil {
			return 0, nil, p.failed("CMD_GET_STATEBLOB", err)
		}
		if rc := binary.BigEndian.Uint32(hdr); rc != 0 {
			return 0, nil, p.failed("CMD_GET_STATEBLOB", fmt.Errorf("result 0x%x", rc))
		}
		flags = binary.BigEndian.Uint32(hdr[4:])
		total, n := binary.BigEndian.Uint32(hdr[8:]), binary.BigEndian.Uint32(hdr[12:])
		chunk := make([]byte, n)
		if _, err := io.ReadFull(p.ctrl, chunk); err != nil {
			return 0, nil, p.failed("CMD_GET_STATEBLOB", err)
		}
		blob = append(blob, chunk...)
		if n == 0 || uint32(len(blob)) >= total {
			return flags, blob, nil
		}
	}
}

func (p *proc) setPermanent(flags uint32, blob []byte) error {
	req := append(u32s(ctrlSetStateBlob, flags, blobPermanent, uint32(len(blob))), blob...)
	return p.resultOnly("CMD_SET_STATEBLOB", req)
}

// stop ends the process with CMD_SHUTDOWN (or a kill when that fails) and
// waits for it to exit.
func (p *proc) stop() error {
	var err error
	if p.ctrl != nil && !p.exited() {
		err = p.resultOnly("CMD_SHUTDOWN", u32s(ctrlShutdown))
		p.ctrl.Close()
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.kill()
		if err == nil {
			err = fmt.Errorf("%s did not exit after CMD_SHUTDOWN", p.impl.name)
		}
	}
	if p.ctrl == nil {
		p.kill()
	}
	return err
}

func (p *proc) kill() {
	if !p.exited() {
		p.cmd.Process.Kill()
	}
	<-p.done
}

// freePort picks a free TCP port on 127.0.0.1 for a data channel.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// wire is a go-tpm transport over a raw swtpm data connection (no TCTI and
// no simulator prefix). It records how long the last command spent between
// writing the request and reading the whole response.
type wire struct {
	conn net.Conn
	hdr  [10]byte
	last time.Duration
}

func dialData(port int) (*wire, error) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var err error
	for range 200 {
		var c net.Conn
		if c, err = net.Dial("tcp", addr); err == nil {
			return &wire{conn: c}, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil, fmt.Errorf("connect to the data channel %s: %w", addr, err)
}

// Send implements transport.TPM.
func (w *wire) Send(cmd []byte) ([]byte, error) {
	w.conn.SetDeadline(time.Now().Add(60 * time.Second))
	start := time.Now()
	if _, err := w.conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("write TPM command: %w", err)
	}
	if _, err := io.ReadFull(w.conn, w.hdr[:]); err != nil {
		return nil, fmt.Errorf("read TPM response header: %w", err)
	}
	size := binary.BigEndian.Uint32(w.hdr[2:6])
	if size < 10 || size > 1<<16 {
		return nil, fmt.Errorf("TPM response declares %d bytes", size)
	}
	rsp := make([]byte, size)
	copy(rsp, w.hdr[:])
	if _, err := io.ReadFull(w.conn, rsp[10:]); err != nil {
		return nil, fmt.Errorf("read TPM response: %w", err)
	}
	w.last = time.Since(start)
	return rsp, nil
}

func (w *wire) Close() error { return w.conn.Close() }

// newInstanceDir makes a fresh directory under base holding an empty state
// directory and the control socket, and returns the options naming them.
func newInstanceDir(base string) (procOpts, error) {
	d, err := os.MkdirTemp(base, "tpm-")
	if err != nil {
		return procOpts{}, fmt.Errorf("create instance directory: %w", err)
	}
	o := procOpts{stateDir: filepath.Join(d, "state"), ctrlPath: filepath.Join(d, "ctrl.sock")}
	if err := os.Mkdir(o.stateDir, 0o700); err != nil {
		return procOpts{}, fmt.Errorf("create state directory: %w", err)
	}
	return o, nil
}

// removeInstanceDir removes what newInstanceDir made.
func removeInstanceDir(o procOpts) error {
	return os.RemoveAll(filepath.Dir(o.stateDir))
}
