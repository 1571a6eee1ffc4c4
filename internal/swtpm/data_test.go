package swtpm_test

import (
	"bytes"
	"errors"
	"io"
	"syscall"
	"testing"

	"vtpm/internal/swtpm"
)

// segReader returns its segments one read at a time, like a stream socket
// on which each write arrived separately, then io.EOF.
type segReader struct{ segs [][]byte }

func (r *segReader) Read(p []byte) (int, error) {
	for len(r.segs) > 0 && len(r.segs[0]) == 0 {
		r.segs = r.segs[1:]
	}
	if len(r.segs) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.segs[0])
	r.segs[0] = r.segs[0][n:]
	return n, nil
}

// TPM 2.0 commands as QEMU and the tools send them.
var (
	readClock = []byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x81}
	getRandom = []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}
	// TPM 1.2 TPM_GetTicks, QEMU's fallback probe.
	getTicks = []byte{0x00, 0xc1, 0, 0, 0, 0x0a, 0, 0, 0, 0xf1}
)

// prefixed wraps cmd in the TCG simulator's TPM_SEND_COMMAND header.
func prefixed(loc byte, cmd []byte) []byte {
	return append(be(8, []byte{loc}, len(cmd)), cmd...)
}

func TestDataReader(t *testing.T) {
	type result struct {
		cmd      []byte
		prefixed bool
		locality uint8
		err      error
	}
	long := bytes.Repeat([]byte{0xAB}, 266)
	copy(long, []byte{0x80, 0x01, 0, 0, 0x01, 0x0a, 0, 0, 0x01, 0x4e}) // 266 bytes, TPM2_NV_Write
	tests := []struct {
		name     string
		segments [][]byte
		want     []result
	}{
		{"one write", seg(readClock), []result{{cmd: readClock}, {err: io.EOF}}},
		{"split inside the header", seg(getRandom[:4], getRandom[4:]), []result{{cmd: getRandom}, {err: io.EOF}}},
		{"split after the header", seg(getRandom[:10], getRandom[10:]), []result{{cmd: getRandom}}},
		{"byte by byte", seg(getRandom[:1], getRandom[1:2], getRandom[2:3], getRandom[3:7], getRandom[7:11], getRandom[11:]), []result{{cmd: getRandom}}},
		{"body in several writes", seg(long[:10], long[10:100], long[100:]), []result{{cmd: long}}},
		{"two commands, one per write", seg(readClock, getRandom), []result{{cmd: readClock}, {cmd: getRandom}, {err: io.EOF}}},
		{"TPM 1.2 probe", seg(getTicks), []result{{cmd: getTicks}}},
		{"send-command prefix", seg(prefixed(3, getRandom)), []result{{cmd: getRandom, prefixed: true, locality: 3}}},
		{"send-command prefix split", seg(prefixed(0, getRandom)[:5], prefixed(0, getRandom)[5:12], prefixed(0, getRandom)[12:]), []result{{cmd: getRandom, prefixed: true}}},
		{"prefix declaring too little", seg(append(be(8, []byte{1}, 4), getRandom...)), []result{{cmd: getRandom, prefixed: true, locality: 1}}},
		{"size below the header: handed over as it came", seg([]byte{0x80, 0x01, 0, 0, 0, 4, 0, 0, 1, 0x44, 0, 0}), []result{{cmd: []byte{0x80, 0x01, 0, 0, 0, 4, 0, 0, 1, 0x44, 0, 0}}}},
		{"size beyond the buffer: handed over as it came", seg([]byte{0x80, 0x01, 0, 1, 0, 0, 0, 0, 1, 0x44, 0, 0}), []result{{cmd: []byte{0x80, 0x01, 0, 1, 0, 0, 0, 0, 1, 0x44, 0, 0}}}},
		{"EOF before a command", nil, []result{{err: io.EOF}}},
		{"EOF inside the header", seg(readClock[:5]), []result{{err: io.ErrUnexpectedEOF}}},
		{"EOF inside the body", seg(getRandom[:11]), []result{{err: io.ErrUnexpectedEOF}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Copy the segments: segReader consumes them.
			var segs [][]byte
			for _, s := range tc.segments {
				segs = append(segs, bytes.Clone(s))
			}
			r := swtpm.NewDataReader(&segReader{segs: segs})
			for i, w := range tc.want {
				req, err := r.Read()
				if w.err != nil {
					if !errors.Is(err, w.err) {
						t.Fatalf("read %d: got %+v, %v; want %v", i, req, err, w.err)
					}
					return
				}
				if err != nil {
					t.Fatalf("read %d: %v", i, err)
				}
				if !bytes.Equal(req.Cmd, w.cmd) || req.Prefixed != w.prefixed || req.Locality != w.locality {
					t.Errorf("read %d: got %x prefixed %v locality %d; want %x prefixed %v locality %d",
						i, req.Cmd, req.Prefixed, req.Locality, w.cmd, w.prefixed, w.locality)
				}
			}
		})
	}
}

// TestDataReaderDatagram reads from a datagram socket, as swtpm's own tests
// pass to CMD_SET_DATAFD: each command is one datagram.
func TestDataReaderDatagram(t *testing.T) {
	ours, theirs := sockPair(t, syscall.SOCK_DGRAM)
	for _, cmd := range [][]byte{readClock, getRandom, prefixed(2, readClock)} {
		if _, err := ours.Write(cmd); err != nil {
			t.Fatal(err)
		}
	}
	r := swtpm.NewDataReader(theirs)
	for i, want := range [][]byte{readClock, getRandom, readClock} {
		req, err := r.Read()
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		if !bytes.Equal(req.Cmd, want) {
			t.Errorf("datagram %d: %x, want %x", i, req.Cmd, want)
		}
	}
}

func TestWrapResponse(t *testing.T) {
	rsp := swtpm.TPMResponse(0x101)
	want := append(append(be(10), rsp...), be(0)...)
	if got := swtpm.WrapResponse(rsp); !bytes.Equal(got, want) {
		t.Errorf("WrapResponse = %x, want %x", got, want)
	}
	if !bytes.Equal(swtpm.NotInitialized, swtpm.TPMResponse(0x101)) {
		t.Errorf("NotInitialized = %x, want TPM_RC_FAILURE %x", swtpm.NotInitialized, swtpm.TPMResponse(0x101))
	}
}
