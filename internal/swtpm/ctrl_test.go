package swtpm_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/swtpm"
)

// be builds big-endian wire bytes from u32 fields and raw byte slices.
func be(parts ...any) []byte {
	var b []byte
	for _, p := range parts {
		switch v := p.(type) {
		case int:
			b = binary.BigEndian.AppendUint32(b, uint32(v))
		case uint32:
			b = binary.BigEndian.AppendUint32(b, v)
		case swtpm.Command:
			b = binary.BigEndian.AppendUint32(b, uint32(v))
		case []byte:
			b = append(b, v...)
		case string:
			b = append(b, v...)
		default:
			panic("be: unsupported type")
		}
	}
	return b
}

// unixPair returns two connected AF_UNIX stream sockets.
func unixPair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	return sockPair(t, syscall.SOCK_STREAM)
}

func sockPair(t testing.TB, typ int) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, typ|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// transports gives the server and client ends of a control connection: a
// unix socketpair (the real path, ReadMsgUnix), and net.Pipe, where every
// client write arrives as its own read, so segment boundaries are exact.
var transports = []struct {
	name string
	pair func(t testing.TB) (server, client net.Conn)
}{
	{"unix", func(t testing.TB) (net.Conn, net.Conn) { s, c := unixPair(t); return s, c }},
	{"pipe", func(t testing.TB) (net.Conn, net.Conn) {
		s, c := net.Pipe()
		t.Cleanup(func() { s.Close(); c.Close() })
		return s, c
	}},
}

// feed plays a strictly request/response client, as every real one is: it
// writes the segments of steps[0], and those of each later step once next
// says the previous request has been read; then it closes its end (EOF).
// Each segment is one write. It runs in the background because net.Pipe
// writes block until they are read.
func feed(client net.Conn, next <-chan struct{}, steps [][][]byte) {
	go func() {
		defer client.Close()
		for i, segments := range steps {
			if i > 0 {
				if _, ok := <-next; !ok {
					return
				}
			}
			for _, s := range segments {
				if _, err := client.Write(s); err != nil {
					return
				}
			}
		}
	}()
}

// seg groups the segments of one request.
func seg(segments ...[]byte) [][]byte { return segments }

// want describes one ReadRequest outcome.
type want struct {
	err       error // errors.Is match; nil for a request
	cmd       swtpm.Command
	body      []byte
	blob      []byte // nil: no payload expected
	malformed bool
	drop      bool
}

func check(t *testing.T, i int, req *swtpm.Request, err error, w want) {
	t.Helper()
	if w.err != nil {
		if !errors.Is(err, w.err) {
			t.Fatalf("request %d: got %+v, %v; want error %v", i, req, err, w.err)
		}
		return
	}
	if err != nil {
		t.Fatalf("request %d: %v", i, err)
	}
	if req.Cmd != w.cmd || !bytes.Equal(req.Body, w.body) || req.Malformed != w.malformed || req.Drop != w.drop {
		t.Errorf("request %d: got cmd 0x%x body %x malformed %v drop %v; want cmd 0x%x body %x malformed %v drop %v",
			i, uint32(req.Cmd), req.Body, req.Malformed, req.Drop, uint32(w.cmd), w.body, w.malformed, w.drop)
	}
	if w.blob != nil && !bytes.Equal(req.Blob, w.blob) {
		t.Errorf("request %d: blob of %d bytes %.32x…, want %d bytes %.32x…", i, len(req.Blob), req.Blob, len(w.blob), w.blob)
	}
	if w.blob == nil && len(req.Blob) != 0 {
		t.Errorf("request %d: unexpected blob of %d bytes", i, len(req.Blob))
	}
	if req.FD != nil {
		t.Errorf("request %d: unexpected fd", i)
		req.FD.Close()
	}
}

func TestReadRequest(t *testing.T) {
	blob := bytes.Repeat([]byte("state blob "), 1000) // 11000 bytes, several segments
	big := bytes.Repeat([]byte{0, 0, 0, byte(swtpm.CmdGetCapability)}, 1250)
	tests := []struct {
		name  string
		steps [][][]byte // one entry of write segments per request
		want  []want     // one per step, then what follows the client's close
	}{
		{
			name:  "GET_CAPABILITY",
			steps: [][][]byte{seg(be(swtpm.CmdGetCapability))},
			want:  []want{{cmd: swtpm.CmdGetCapability, body: []byte{}}, {err: io.EOF}},
		},
		{
			name:  "INIT with its 4-byte body",
			steps: [][][]byte{seg(be(swtpm.CmdInit, 1))},
			want:  []want{{cmd: swtpm.CmdInit, body: be(1)}, {err: io.EOF}},
		},
		{
			name:  "INIT with a 5-byte body",
			steps: [][][]byte{seg(be(swtpm.CmdInit, 1, []byte{0}))},
			want:  []want{{cmd: swtpm.CmdInit, body: be(1), malformed: true}},
		},
		{
			// swtpm 0.7.1 waits for the 4th byte and closes the connection
			// when the client closes or 500 ms pass: no answer at all.
			name:  "INIT with a 3-byte body",
			steps: [][][]byte{seg(be(swtpm.CmdInit, []byte{0, 0, 0}))},
			want:  []want{{err: swtpm.ErrShortCommand}},
		},
		{
			name:  "INIT split after the command code",
			steps: [][][]byte{seg(be(swtpm.CmdInit), be(0))},
			want:  []want{{cmd: swtpm.CmdInit, body: be(0)}, {err: io.EOF}},
		},
		{
			name:  "command code split in two",
			steps: [][][]byte{seg([]byte{0, 0}, []byte{0, byte(swtpm.CmdStop)})},
			want:  []want{{cmd: swtpm.CmdStop, body: []byte{}}, {err: io.EOF}},
		},
		{
			name:  "SHUTDOWN with a body",
			steps: [][][]byte{seg(be(swtpm.CmdShutdown, 0))},
			want:  []want{{cmd: swtpm.CmdShutdown, body: []byte{}, malformed: true}},
		},
		{
			name:  "SET_LOCALITY with 1 byte (tcti-swtpm)",
			steps: [][][]byte{seg(be(swtpm.CmdSetLocality, []byte{3}))},
			want:  []want{{cmd: swtpm.CmdSetLocality, body: []byte{3}}, {err: io.EOF}},
		},
		{
			name:  "SET_LOCALITY with 4 bytes (QEMU)",
			steps: [][][]byte{seg(be(swtpm.CmdSetLocality, []byte{4, 0, 0, 0}))},
			want:  []want{{cmd: swtpm.CmdSetLocality, body: []byte{4}}, {err: io.EOF}},
		},
		{
			name:  "SET_LOCALITY without its byte",
			steps: [][][]byte{seg(be(swtpm.CmdSetLocality))},
			want:  []want{{err: swtpm.ErrShortCommand}},
		},
		{
			name:  "RESET_TPMESTABLISHED with 4 bytes (QEMU)",
			steps: [][][]byte{seg(be(swtpm.CmdResetTPMEstablished, []byte{3, 0, 0, 0}))},
			want:  []want{{cmd: swtpm.CmdResetTPMEstablished, body: []byte{3}}},
		},
		{
			name:  "SET_BUFFERSIZE",
			steps: [][][]byte{seg(be(swtpm.CmdSetBufferSize, 3968))},
			want:  []want{{cmd: swtpm.CmdSetBufferSize, body: be(3968)}},
		},
		{
			name:  "GET_INFO (swtpm_setup)",
			steps: [][][]byte{seg(be(swtpm.CmdGetInfo, 0, 3, 0, 0))},
			want:  []want{{cmd: swtpm.CmdGetInfo, body: be(0, 3, 0, 0)}},
		},
		{
			name:  "GET_STATEBLOB (QEMU pre_save)",
			steps: [][][]byte{seg(be(swtpm.CmdGetStateBlob, 1, 1, 0))},
			want:  []want{{cmd: swtpm.CmdGetStateBlob, body: be(1, 1, 0)}},
		},
		{
			name:  "SET_STATEBLOB header and body in separate writes (QEMU post_load)",
			steps: [][][]byte{seg(be(swtpm.CmdSetStateBlob, 0, 1, len(blob)), blob[:4000], blob[4000:8000], blob[8000:])},
			want:  []want{{cmd: swtpm.CmdSetStateBlob, body: be(0, 1, len(blob)), blob: blob}, {err: io.EOF}},
		},
		{
			name:  "SET_STATEBLOB in one write",
			steps: [][][]byte{seg(be(swtpm.CmdSetStateBlob, 0, 2, 100, blob[:100]))},
			want:  []want{{cmd: swtpm.CmdSetStateBlob, body: be(0, 2, 100), blob: blob[:100]}, {err: io.EOF}},
		},
		{
			name:  "SET_STATEBLOB of length 0",
			steps: [][][]byte{seg(be(swtpm.CmdSetStateBlob, 0, 1, 0)), seg(be(swtpm.CmdGetCapability))},
			want:  []want{{cmd: swtpm.CmdSetStateBlob, body: be(0, 1, 0), blob: []byte{}}, {cmd: swtpm.CmdGetCapability, body: []byte{}}},
		},
		{
			name:  "SET_STATEBLOB cut short",
			steps: [][][]byte{seg(be(swtpm.CmdSetStateBlob, 0, 1, 500), blob[:499])},
			want:  []want{{err: swtpm.ErrShortCommand}},
		},
		{
			name:  "SET_STATEBLOB larger than accepted",
			steps: [][][]byte{seg(be(swtpm.CmdSetStateBlob, 0, 1, swtpm.MaxStateBlob+1))},
			want:  []want{{cmd: swtpm.CmdSetStateBlob, body: be(0, 1, swtpm.MaxStateBlob+1), malformed: true, drop: true}},
		},
		{
			name:  "SET_STATEBLOB followed by the next command",
			steps: [][][]byte{seg(be(swtpm.CmdSetStateBlob, 0, 1, 3), []byte("abc")), seg(be(swtpm.CmdInit, 1))},
			want:  []want{{cmd: swtpm.CmdSetStateBlob, body: be(0, 1, 3), blob: []byte("abc")}, {cmd: swtpm.CmdInit, body: be(1)}, {err: io.EOF}},
		},
		{
			name:  "HASH_DATA",
			steps: [][][]byte{seg(be(swtpm.CmdHashData, 5), []byte("hello"))},
			want:  []want{{cmd: swtpm.CmdHashData, body: be(5), blob: []byte("hello")}, {err: io.EOF}},
		},
		{
			// The payload must not be read as commands: either it is consumed
			// or the connection is dropped. Here it is 1250 GET_CAPABILITYs.
			name:  "HASH_DATA larger than a chunk",
			steps: [][][]byte{seg(be(swtpm.CmdHashData, len(big)), big)},
			want:  []want{{cmd: swtpm.CmdHashData, body: be(len(big)), malformed: true, drop: true}, {err: io.EOF}},
		},
		{
			name:  "unknown command",
			steps: [][][]byte{seg(be(0x77))},
			want:  []want{{cmd: 0x77, body: []byte{}}, {err: io.EOF}},
		},
		{
			name:  "QEMU reset: STOP, SET_BUFFERSIZE, INIT, SET_LOCALITY",
			steps: [][][]byte{seg(be(swtpm.CmdStop)), seg(be(swtpm.CmdSetBufferSize, 0)), seg(be(swtpm.CmdInit, 0)), seg(be(swtpm.CmdSetLocality, []byte{0, 0, 0, 0}))},
			want: []want{
				{cmd: swtpm.CmdStop, body: []byte{}},
				{cmd: swtpm.CmdSetBufferSize, body: be(0)},
				{cmd: swtpm.CmdInit, body: be(0)},
				{cmd: swtpm.CmdSetLocality, body: []byte{0}},
				{err: io.EOF},
			},
		},
		{
			name:  "EOF before a command",
			steps: nil,
			want:  []want{{err: io.EOF}},
		},
		{
			name:  "EOF inside the command code",
			steps: [][][]byte{seg([]byte{0, 0})},
			want:  []want{{err: swtpm.ErrShortCommand}},
		},
	}
	for _, tr := range transports {
		for _, tc := range tests {
			t.Run(tr.name+"/"+tc.name, func(t *testing.T) {
				server, client := tr.pair(t)
				next := make(chan struct{}, len(tc.steps))
				c := swtpm.NewConn(server)
				defer c.Close()
				defer close(next)
				feed(client, next, tc.steps)
				for i, w := range tc.want {
					if i > 0 && i < len(tc.steps) {
						next <- struct{}{}
					}
					req, err := c.ReadRequest()
					check(t, i, req, err, w)
					if err != nil || req.Drop {
						break
					}
				}
			})
		}
	}
}

// TestReadRequestPipelined pins swtpm's behaviour for a client that writes
// two commands at once: the first is answered, the rest of the chunk is
// dropped (no real client pipelines).
func TestReadRequestPipelined(t *testing.T) {
	server, client := unixPair(t)
	if _, err := client.Write(be(swtpm.CmdGetCapability, swtpm.CmdGetConfig)); err != nil {
		t.Fatal(err)
	}
	client.Close()
	c := swtpm.NewConn(server)
	req, err := c.ReadRequest()
	check(t, 0, req, err, want{cmd: swtpm.CmdGetCapability, body: []byte{}})
	req, err = c.ReadRequest()
	check(t, 1, req, err, want{err: io.EOF})
}

// TestReadRequestIncompleteTimesOut checks that a command whose body never
// comes does not block the channel forever (swtpm allows 500 ms).
func TestReadRequestIncompleteTimesOut(t *testing.T) {
	server, client := unixPair(t)
	if _, err := client.Write(be(swtpm.CmdSetStateBlob, 0, 1, 10, "abc")); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := swtpm.NewConn(server).ReadRequest()
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, swtpm.ErrShortCommand) {
			t.Errorf("ReadRequest = %v, want ErrShortCommand", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("ReadRequest still waits for a body the client never sends")
	}
}

// sendFD writes msg with fd attached as SCM_RIGHTS, as QEMU does for SET_DATAFD.
func sendFD(t *testing.T, c *net.UnixConn, msg []byte, fd int) {
	t.Helper()
	var oob []byte
	if fd >= 0 {
		oob = syscall.UnixRights(fd)
	}
	if _, _, err := c.WriteMsgUnix(msg, oob, nil); err != nil {
		t.Fatal(err)
	}
}

func TestReadRequestSetDataFD(t *testing.T) {
	for _, typ := range []struct {
		name string
		typ  int
	}{{"stream", syscall.SOCK_STREAM}, {"datagram", syscall.SOCK_DGRAM}} {
		t.Run(typ.name, func(t *testing.T) {
			server, client := unixPair(t)
			// QEMU's data channel: a socketpair whose one end it passes on.
			ours, theirs := sockPair(t, typ.typ)
			f, err := theirs.File()
			if err != nil {
				t.Fatal(err)
			}
			sendFD(t, client, be(swtpm.CmdSetDataFD), int(f.Fd()))
			f.Close()
			theirs.Close()

			req, err := swtpm.NewConn(server).ReadRequest()
			if err != nil {
				t.Fatal(err)
			}
			if req.Cmd != swtpm.CmdSetDataFD || req.Malformed || len(req.Body) != 0 {
				t.Errorf("got cmd 0x%x body %x malformed %v", uint32(req.Cmd), req.Body, req.Malformed)
			}
			if req.FD == nil {
				t.Fatal("the passed fd did not arrive")
			}
			// The fd is the passed end: what we write on ours arrives there.
			data, err := net.FileConn(req.FD)
			req.FD.Close()
			if err != nil {
				t.Fatalf("passed fd is not a socket: %v", err)
			}
			defer data.Close()
			cmd := []byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x81} // TPM2_ReadClock, QEMU's probe
			if _, err := ours.Write(cmd); err != nil {
				t.Fatal(err)
			}
			got, err := swtpm.NewDataReader(data).Read()
			if err != nil {
				t.Fatalf("reading the passed data channel: %v", err)
			}
			if !bytes.Equal(got.Cmd, cmd) {
				t.Errorf("the passed data channel carried %x, want %x", got.Cmd, cmd)
			}
		})
	}
}

func TestReadRequestSetDataFDWithoutFD(t *testing.T) {
	server, client := unixPair(t)
	sendFD(t, client, be(swtpm.CmdSetDataFD), -1)
	req, err := swtpm.NewConn(server).ReadRequest()
	if err != nil {
		t.Fatal(err)
	}
	if req.Cmd != swtpm.CmdSetDataFD || req.FD != nil {
		t.Errorf("got cmd 0x%x fd %v, want SET_DATAFD without fd", uint32(req.Cmd), req.FD)
	}
}

// TestReadRequestFDWithSplitCommand checks that an fd riding on the first
// bytes of a command split across writes is kept, as swtpm's recvmsg does.
func TestReadRequestFDWithSplitCommand(t *testing.T) {
	server, client := unixPair(t)
	_, theirs := unixPair(t)
	f, err := theirs.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// The fd rides on the first two bytes of the command code.
	sendFD(t, client, []byte{0, 0}, int(f.Fd()))
	done := make(chan struct{})
	var req *swtpm.Request
	go func() {
		defer close(done)
		req, err = swtpm.NewConn(server).ReadRequest()
	}()
	if _, werr := client.Write([]byte{0, byte(swtpm.CmdSetDataFD)}); werr != nil {
		t.Fatal(werr)
	}
	<-done
	if err != nil {
		t.Fatal(err)
	}
	if req.Cmd != swtpm.CmdSetDataFD || req.FD == nil {
		t.Fatalf("got cmd 0x%x fd %v, want SET_DATAFD with its fd", uint32(req.Cmd), req.FD)
	}
	req.FD.Close()
}
