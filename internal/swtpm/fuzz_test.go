package swtpm_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm"
)

// fuzzBound turns a hang into a failure; it is never a measurement.
const fuzzBound = 10 * time.Second

// split cuts stream into write segments: each byte of cuts is the length of
// the next segment minus one; what is left after the cuts is the last one.
func split(stream, cuts []byte) [][]byte {
	var segs [][]byte
	for _, c := range cuts {
		if len(stream) == 0 {
			break
		}
		n := min(int(c)+1, len(stream))
		segs = append(segs, stream[:n])
		stream = stream[n:]
	}
	if len(stream) > 0 {
		segs = append(segs, stream)
	}
	return segs
}

// cutsFor returns cuts that make each of parts its own write segment.
func cutsFor(parts ...[]byte) (stream, cuts []byte) {
	for _, p := range parts {
		stream = append(stream, p...)
		for n := len(p); n > 0; n -= 256 {
			cuts = append(cuts, byte(min(n, 256)-1))
		}
	}
	return stream, cuts
}

// ctrlBody is the fixed body each command has (see the protocol reference).
func ctrlBody(c swtpm.Command) int {
	switch c {
	case swtpm.CmdInit, swtpm.CmdSetBufferSize, swtpm.CmdHashData:
		return 4
	case swtpm.CmdSetLocality, swtpm.CmdResetTPMEstablished:
		return 1
	case swtpm.CmdGetStateBlob, swtpm.CmdSetStateBlob:
		return 12
	case swtpm.CmdGetInfo:
		return 16
	}
	return 0
}

// FuzzCtrlRequest feeds arbitrary bytes, cut into arbitrary writes, to
// ReadRequest over net.Pipe or a unix socketpair (with an fd riding on the
// first write). It must never panic or hang, and what it returns must be
// consistent with the bytes sent.
func FuzzCtrlRequest(f *testing.F) {
	add := func(unix bool, parts ...[]byte) {
		stream, cuts := cutsFor(parts...)
		f.Add(stream, cuts, unix)
	}
	// QEMU 7.2 start-up (protocol reference §3.3) and a guest reset.
	qemuStart := [][]byte{
		be(0x10),       // SET_DATAFD (the fd rides along on unix)
		be(0x01),       // GET_CAPABILITY
		be(0x0E),       // STOP
		be(0x11, 0),    // SET_BUFFERSIZE(0)
		be(0x0E),       // STOP
		be(0x11, 3968), // SET_BUFFERSIZE(CRB)
		be(0x02, 0),    // INIT(0)
		be(0x05, 0),    // SET_LOCALITY(0), 4 bytes
		be(0x04),       // GET_TPMESTABLISHED
		be(0x0B, 3<<24),
	}
	add(true, qemuStart...)
	add(false, qemuStart...)
	// QEMU migration: pre_save, then post_load with the header and the body
	// in separate writes, then INIT(DELETE_VOLATILE).
	blob := bytes.Repeat([]byte{0x02, 0x01, 0x00, 0x0a, 0, 4, 0, 0, 0x05, 0x1c}, 130)
	add(false, be(0x0C, 1, 1, 0), be(0x0C, 1, 2, 0), be(0x0C, 1, 3, 0),
		be(0x0E), be(0x0D, 0, 1, len(blob)), blob, be(0x0D, 0, 2, 10), blob[:10], be(0x02, 1))
	// tpm2-tss swtpm TCTI: SET_LOCALITY with one byte; reset = INIT(1).
	add(false, be(0x05)[:4], []byte{0})
	f.Add(append(be(0x05), 0), []byte{}, false)
	add(false, be(0x02, 1))
	// swtpm_setup: GET_INFO(3), SHUTDOWN.
	add(true, be(0x12, 0, 3, 0, 0), be(0x03))
	// swtpm_ioctl -h and -v, -g, -b, --info.
	add(false, be(0x06), append(be(0x07, 5), "hello"...), be(0x08), be(0x0A), be(0x0F), be(0x11, 4096), be(0x12, 0, 4, 0, 0))
	// Malformed: short INIT, long SHUTDOWN, oversize blob and hash, junk.
	f.Add(be(0x02)[:3], []byte{}, false)
	f.Add(append(be(0x02), 0, 0, 0), []byte{}, true)
	f.Add(be(0x03, 0), []byte{}, false)
	f.Add(be(0x0D, 0, 1, 0x7fffffff), []byte{}, false)
	f.Add(be(0x07, 5000), []byte{}, true)
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"), []byte{3, 3}, false)

	// The descriptor passed along on unix sockets, as SET_DATAFD passes one.
	passed, err := os.Open(os.DevNull)
	if err != nil {
		f.Fatal(err)
	}
	defer passed.Close()

	f.Fuzz(func(t *testing.T, stream, cuts []byte, unix bool) {
		if len(stream) > 1<<15 {
			return // larger streams only repeat what smaller ones reach, slowly
		}
		segs := split(stream, cuts)
		var server, client net.Conn
		var uc *net.UnixConn
		if unix {
			s, c := unixPair(t)
			server, client, uc = s, c, c
		} else {
			server, client = net.Pipe()
		}
		defer client.Close()
		go func() {
			defer client.Close()
			for i, s := range segs {
				var err error
				if i == 0 && uc != nil {
					_, _, err = uc.WriteMsgUnix(s, syscall.UnixRights(int(passed.Fd())), nil)
				} else {
					_, err = client.Write(s)
				}
				if err != nil {
					return
				}
			}
		}()

		done := make(chan struct{})
		go func() {
			defer close(done)
			c := swtpm.NewConn(server)
			defer c.Close()
			for i := 0; ; i++ {
				req, err := c.ReadRequest()
				if err != nil {
					if req != nil {
						t.Errorf("ReadRequest returned a request with error %v", err)
					}
					return
				}
				checkCtrlRequest(t, i, stream, req, unix)
				if req.FD != nil {
					req.FD.Close()
				}
				if req.Drop {
					return
				}
				if i > len(stream) {
					t.Errorf("%d requests from %d bytes", i, len(stream))
					return
				}
			}
		}()
		select {
		case <-done:
		case <-time.After(fuzzBound):
			server.Close()
			t.Fatalf("ReadRequest hangs on %d bytes in %d writes", len(stream), len(segs))
		}
	})
}

func checkCtrlRequest(t *testing.T, i int, stream []byte, req *swtpm.Request, unix bool) {
	t.Helper()
	if i == 0 && len(stream) >= 4 && req.Cmd != swtpm.Command(binary.BigEndian.Uint32(stream)) {
		t.Errorf("first request is command 0x%x, the stream starts with %x", uint32(req.Cmd), stream[:4])
	}
	if want := ctrlBody(req.Cmd); len(req.Body) != want {
		t.Errorf("command 0x%x: body of %d bytes, want %d", uint32(req.Cmd), len(req.Body), want)
		return
	}
	if req.Drop && !req.Malformed {
		t.Errorf("command 0x%x: Drop without Malformed", uint32(req.Cmd))
	}
	if req.FD != nil && (!unix || i > 0) {
		t.Errorf("request %d carries an fd that was never sent", i)
	}
	switch {
	case req.Malformed:
	case req.Cmd == swtpm.CmdSetStateBlob:
		if l := req.U32(2); uint32(len(req.Blob)) != l || l > swtpm.MaxStateBlob {
			t.Errorf("SET_STATEBLOB announces %d bytes, carries %d", l, len(req.Blob))
		}
		if !bytes.Contains(stream, req.Blob) {
			t.Errorf("SET_STATEBLOB blob was not in the stream")
		}
	case req.Cmd == swtpm.CmdHashData:
		if l := req.U32(0); uint32(len(req.Blob)) != l || l > 4096 {
			t.Errorf("HASH_DATA announces %d bytes, carries %d", l, len(req.Blob))
		}
		if !bytes.Contains(stream, req.Blob) {
			t.Errorf("HASH_DATA payload was not in the stream")
		}
	default:
		if len(req.Blob) != 0 {
			t.Errorf("command 0x%x carries a %d-byte payload", uint32(req.Cmd), len(req.Blob))
		}
	}
}

// FuzzDataReader reads TPM commands from arbitrary bytes cut into arbitrary
// reads. It must never panic or loop, every command handed over must come
// from the stream, and a well-formed first command must come out whole.
func FuzzDataReader(f *testing.F) {
	for _, cmd := range [][]byte{readClock, getRandom, getTicks} {
		f.Add(cmd, []byte{})
		f.Add(prefixed(0, cmd), []byte{4, 4})
	}
	nvWrite := bytes.Repeat([]byte{0xAB}, 266)
	copy(nvWrite, []byte{0x80, 0x02, 0, 0, 0x01, 0x0a, 0, 0, 0x01, 0x37})
	f.Add(append(append(bytes.Clone(readClock), getRandom...), nvWrite...), []byte{9, 11, 99})
	f.Add([]byte{0x80, 0x01, 0xff, 0xff, 0xff, 0xff, 0, 0, 1, 0x44}, []byte{})
	f.Add(prefixed(9, []byte{1, 2, 3}), []byte{})

	f.Fuzz(func(t *testing.T, stream, cuts []byte) {
		segs := split(bytes.Clone(stream), cuts)
		r := swtpm.NewDataReader(&segReader{segs: segs})
		for i := 0; ; i++ {
			req, err := r.Read()
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Errorf("read %d: unexpected error %v", i, err)
				}
				return
			}
			if i > len(stream)/10 {
				t.Fatalf("%d commands from %d bytes: each needs at least a 10-byte header", i+1, len(stream))
			}
			if len(req.Cmd) > swtpm.MaxCommand+9 {
				t.Errorf("read %d: %d-byte command exceeds the buffer", i, len(req.Cmd))
			}
			if !bytes.Contains(stream, req.Cmd) {
				t.Errorf("read %d: command %x is not in the stream", i, req.Cmd)
			}
			if i == 0 {
				checkFirstDataRequest(t, stream, req)
			}
		}
	})
}

func checkFirstDataRequest(t *testing.T, stream []byte, req *swtpm.DataRequest) {
	t.Helper()
	tag := binary.BigEndian.Uint16(stream)
	off := 0
	if tag != 0x8001 && tag != 0x8002 && binary.BigEndian.Uint32(stream) == 8 {
		if !req.Prefixed || req.Locality != stream[4] {
			t.Errorf("prefixed command: got prefixed %v locality %d, want locality %d", req.Prefixed, req.Locality, stream[4])
		}
		off = 9
	} else if req.Prefixed {
		t.Errorf("command %x is taken as prefixed", stream[:10])
	}
	if !bytes.HasPrefix(stream[off:], req.Cmd) {
		t.Errorf("first command %x is not where the stream starts (%x)", req.Cmd, stream[off:min(len(stream), off+16)])
	}
	var size int
	if off == 9 {
		size = int(binary.BigEndian.Uint32(stream[5:]))
	} else {
		size = int(binary.BigEndian.Uint32(stream[2:]))
	}
	if size >= 10 && off+size <= swtpm.MaxCommand+9 && off+size <= len(stream) && len(req.Cmd) != size {
		t.Errorf("first command declares %d bytes and they all arrived, but %d were handed over", size, len(req.Cmd))
	}
}

// FuzzParseOptions parses arbitrary command lines (NUL-separated, as in
// /proc/PID/cmdline) with arbitrary TPM_PATH and TPM_PORT. Parse must never
// panic, must fail only with usage errors, must be deterministic, and a
// configuration it accepts must be one the instance can act on.
func FuzzParseOptions(f *testing.F) {
	argv := func(s string) string { return strings.Join(strings.Fields(s), "\x00") }
	seeds := []struct{ args, path, port string }{
		// libvirt 9.x
		{"--ctrl type=unixio,path=/run/libvirt/qemu/swtpm/1-vm-swtpm.sock,mode=0600 --tpmstate dir=/var/lib/libvirt/swtpm/u/tpm2,mode=0600 --log file=/var/log/swtpm/libvirt/qemu/vm-swtpm.log --terminate --tpm2", "", ""},
		{"--ctrl type=unixio,path=/s,mode=0600 --tpmstate dir=/d,mode=0600 --log file=/l --terminate --tpm2 --key pwdfd=20,mode=aes-256-cbc --migration-key pwdfd=21,mode=aes-256-cbc", "", ""},
		// swtpm_setup 0.7.1
		{"--print-capabilities --log file=/var/log/swtpm_setup.log", "", ""},
		{"--tpm2 --print-capabilities", "", ""},
		{"--print-states --tpmstate backend-uri=dir:///var/lib/swtpm/st --tpm2 --log file=/l", "", ""},
		{"--flags not-need-init,startup-clear --tpmstate backend-uri=dir:///st --pid file=/tmp/s/.swtpm_setup.pidfile.X --tpm2 --log file=/l --server type=tcp,fd=5 --ctrl type=unixio,clientfd=6", "", ""},
		// QEMU documentation and tpm2-tss
		{"--tpmstate dir=/tmp/mytpm1 --ctrl type=unixio,path=/tmp/mytpm1/swtpm-sock --tpm2 --log level=20", "", ""},
		{"--tpm2 -p 2321 --ctrl type=tcp,port=2322 --log fd=1,level=5 --flags not-need-init --tpmstate dir=/tmp/tss --locality allow-set-locality", "", ""},
		// swtpm's own tests: TPM_PATH and TPM_PORT
		{"--tpm2 --server type=tcp --ctrl type=tcp,port=65501 --flags startup-clear", "/tmp/st", "65500"},
		{"--tpm2 -f 100 -t --locality reject-locality-4 --seccomp action=none --runas tss -d --pid fd=7", "/tmp/st", ""},
		{"--tpm2 --tpmstate dir=/d --data-key file=/k,format=binary --allow-rollback --server type=unixio,path=/s,uid=1,gid=2", "", ""},
		{"--tpm2 -p 65535 --tpmstate dir=/d --ctrl type=tcp,port=0,bindaddr=0.0.0.0", "", ""},
		{"-v", "", ""},
		{"--help", "", ""},
	}
	for _, s := range seeds {
		f.Add(argv(s.args), s.path, s.port)
	}
	f.Fuzz(func(t *testing.T, cmdline, tpmPath, tpmPort string) {
		var args []string
		if cmdline != "" {
			args = strings.Split(cmdline, "\x00")
		}
		getenv := env("TPM_PATH", tpmPath, "TPM_PORT", tpmPort)
		c, x, err := swtpm.Parse(args, getenv)
		c2, x2, err2 := swtpm.Parse(args, getenv)
		if (err == nil) != (err2 == nil) || (err != nil && err.Error() != err2.Error()) || !reflect.DeepEqual(c, c2) || !reflect.DeepEqual(x, x2) {
			t.Fatalf("Parse is not deterministic: %v / %v", err, err2)
		}
		if err != nil {
			if c != nil || x != nil {
				t.Errorf("Parse returned a config with error %v", err)
			}
			if !swtpm.IsUsage(err) {
				t.Errorf("Parse error %q is not a usage error", err)
			}
			return
		}
		checkConfig(t, args, c)
		switch x.Isolation {
		case sandbox.Required, sandbox.Preferred, sandbox.None:
		default:
			t.Errorf("Parse(%q) accepted isolation %q", args, x.Isolation)
		}
	})
}

// checkConfig asserts the invariants of an accepted command line.
func checkConfig(t *testing.T, args []string, c *swtpm.Options) {
	t.Helper()
	fail := func(format string, a ...any) {
		t.Helper()
		t.Errorf("Parse(%q) accepted: "+format+"\n%s", append(append([]any{args}, a...), describe(c))...)
	}
	if c.ShowHelp || c.ShowVersion || c.PrintCaps {
		return
	}
	if c.StateDir == "" && c.StateFile == "" {
		fail("no state location")
	}
	if c.PrintStates {
		return
	}
	if c.StateMode > 0o777 {
		fail("state mode %o", c.StateMode)
	}
	if c.Server == nil && c.DataFD < 0 && c.Ctrl == nil {
		fail("no data channel")
	}
	if c.DataFD >= 0 && (c.DataFD <= 2 || !c.Terminate) {
		fail("data fd %d (terminate %v)", c.DataFD, c.Terminate)
	}
	if c.DataFD < -1 || c.PidFD < -1 || c.Log.FD < -1 || c.Log.Level < 0 {
		fail("negative descriptor or level")
	}
	for _, e := range []struct {
		name string
		ep   *swtpm.Endpoint
	}{{"--ctrl", c.Ctrl}, {"--server", c.Server}} {
		ep := e.ep
		if ep == nil {
			continue
		}
		if ep.FD < -1 || ep.ClientFD < -1 || ep.UID < -1 || ep.GID < -1 || ep.Mode > 0o777 {
			fail("%s has out-of-range fields", e.name)
		}
		switch ep.Type {
		case "unixio":
			if ep.Path == "" && ep.FD < 0 && ep.ClientFD < 0 {
				fail("%s type=unixio without path or fd", e.name)
			}
		case "tcp":
			if ep.ClientFD >= 0 {
				fail("%s type=tcp with clientfd", e.name)
			}
			if ep.FD < 0 && (ep.Port < 0 || ep.Port > 65535) {
				fail("%s listens on port %d", e.name, ep.Port)
			}
			if ep.FD < 0 && ep.BindAddr == "" {
				fail("%s listens on every interface: no bind address", e.name)
			}
		default:
			fail("%s type %q", e.name, ep.Type)
		}
	}
	if c.Server != nil && c.Server.ClientFD >= 0 {
		fail("--server with clientfd")
	}
	switch c.Startup {
	case "":
	case "clear", "state", "deactivated":
		if !c.NotNeedInit {
			fail("startup-%s without not-need-init", c.Startup)
		}
	case "none":
	default:
		fail("startup %q", c.Startup)
	}
	switch c.Seccomp {
	case "", "none", "kill", "log":
	default:
		fail("seccomp action %q", c.Seccomp)
	}
}
