// Package swtpm implements the wire protocol and command-line surface of
// swtpm 0.7.1, so that QEMU, libvirt, swtpm_setup, swtpm_ioctl and the tpm2-tss
// swtpm TCTI can drive vtpm unchanged. It knows nothing of keys or libtpms:
// it frames requests and responses; the instance package acts on them.
package swtpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"vtpm/internal/tpmrc"
)

// Command is a control-channel command code (swtpm's CMD_*; PTM ioctl number + 1).
type Command uint32

// Control-channel commands of swtpm 0.7.1.
const (
	CmdGetCapability       Command = 0x01
	CmdInit                Command = 0x02
	CmdShutdown            Command = 0x03
	CmdGetTPMEstablished   Command = 0x04
	CmdSetLocality         Command = 0x05
	CmdHashStart           Command = 0x06
	CmdHashData            Command = 0x07
	CmdHashEnd             Command = 0x08
	CmdCancelTPMCmd        Command = 0x09
	CmdStoreVolatile       Command = 0x0A
	CmdResetTPMEstablished Command = 0x0B
	CmdGetStateBlob        Command = 0x0C
	CmdSetStateBlob        Command = 0x0D
	CmdStop                Command = 0x0E
	CmdGetConfig           Command = 0x0F
	CmdSetDataFD           Command = 0x10
	CmdSetBufferSize       Command = 0x11
	CmdGetInfo             Command = 0x12
)

// Capabilities is what GET_CAPABILITY reports: every 0.7.1 command for TPM 2.0
// (0xFFFF). Bit 16 (LOCK_STORAGE) is deliberately absent; QEMU 7.2 would
// otherwise send CMD_LOCK_STORAGE after migration.
const Capabilities uint64 = 0xFFFF

// Init flags, state-blob flags and GET_CONFIG flags.
const (
	InitFlagDeleteVolatile uint32 = 1
	StateFlagDecrypted     uint32 = 1
	StateFlagEncrypted     uint32 = 2
	ConfigFlagFileKey      uint32 = 1 // --key is set
	ConfigFlagMigrationKey uint32 = 2 // a migration key is set
)

// MaxInfoChunk is the most GET_INFO returns at once (ptm_getinfo's buffer).
const MaxInfoChunk = 3072

// Blob types on the wire (ptm numbering).
const (
	BlobPermanent uint32 = 1
	BlobVolatile  uint32 = 2
	BlobSaveState uint32 = 3
)

const (
	// maxChunk is swtpm's ctrl input buffer (4 + 4100); a first read never
	// takes more, so trailing bytes of a pipelined command are dropped as in swtpm.
	maxChunk = 4 + 4100
	// commandDeadline bounds how long the rest of a started command may take.
	commandDeadline = 500 * time.Millisecond
	// MaxStateBlob bounds SET_STATEBLOB bodies (swtpm >= 0.8 uses 512 KiB too).
	MaxStateBlob = 512 * 1024
	// maxHashData is the largest HASH_DATA chunk (ptm_hdata.data).
	maxHashData = 4096
)

// ErrShortCommand means a command started but its body did not arrive in time;
// swtpm closes the connection in that case, and so do we.
var ErrShortCommand = errors.New("swtpm ctrl: incomplete command")

// Request is one control-channel command read off the wire.
type Request struct {
	Cmd  Command
	Body []byte   // the fixed part of the body (see bodySize)
	FD   *os.File // file passed with SCM_RIGHTS, if any (SET_DATAFD)
	// Blob is the streamed payload of SET_STATEBLOB or HASH_DATA.
	Blob []byte
	// Malformed is set when the body violates the command's size rule; the
	// caller answers tpmrc.TPMBadParameter without acting.
	Malformed bool
	// Drop is set when the stream cannot be resynchronised after this
	// request; the caller answers and closes the connection.
	Drop bool
}

// bodyRule is how swtpm 0.7.1 checks a command's body (observed against it):
// the fixed body size; whether more bytes in the first read are an error; and
// whether a short body is answered at once rather than waited for.
type bodyRule struct {
	n            int
	exact        bool
	shortIsError bool // a short first read is answered with TPM_BAD_PARAMETER, not waited on
}

func bodySize(c Command) bodyRule {
	switch c {
	case CmdInit:
		return bodyRule{n: 4, exact: true}
	case CmdShutdown, CmdGetTPMEstablished, CmdHashStart, CmdHashEnd,
		CmdCancelTPMCmd, CmdStoreVolatile, CmdStop, CmdGetConfig:
		return bodyRule{exact: true}
	case CmdSetLocality, CmdResetTPMEstablished:
		return bodyRule{n: 1}
	case CmdHashData:
		return bodyRule{n: 4}
	case CmdGetStateBlob, CmdSetStateBlob:
		return bodyRule{n: 12}
	case CmdSetBufferSize:
		return bodyRule{n: 4, shortIsError: true}
	case CmdGetInfo:
		return bodyRule{n: 16, shortIsError: true}
	}
	return bodyRule{}
}

// NeedsRunning reports whether a command is refused (TPM_BAD_ORDINAL)
// while the TPM is not running; swtpm checks that before the body's size.
func NeedsRunning(c Command) bool {
	switch c {
	case CmdGetTPMEstablished, CmdHashStart, CmdHashData, CmdHashEnd, CmdCancelTPMCmd,
		CmdStoreVolatile, CmdResetTPMEstablished, CmdGetStateBlob:
		return true
	}
	return false
}

// Conn reads control commands from one client connection.
type Conn struct {
	c   net.Conn
	buf []byte
	oob []byte
}

// NewConn wraps an accepted control connection.
func NewConn(c net.Conn) *Conn {
	return &Conn{c: c, buf: make([]byte, maxChunk), oob: make([]byte, syscall.CmsgSpace(4))}
}

// Close closes the connection.
func (c *Conn) Close() error { return c.c.Close() }

// first reads the first chunk of a command, collecting a passed fd on unix sockets.
func (c *Conn) first() (int, *os.File, error) {
	uc, ok := c.c.(*net.UnixConn)
	if !ok {
		n, err := c.c.Read(c.buf)
		return n, nil, err
	}
	n, oobn, _, _, err := uc.ReadMsgUnix(c.buf, c.oob)
	if err != nil || oobn == 0 {
		return n, nil, err
	}
	msgs, perr := syscall.ParseSocketControlMessage(c.oob[:oobn])
	if perr != nil {
		return n, nil, nil
	}
	var f *os.File
	for _, m := range msgs {
		fds, err := syscall.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if f == nil {
				f = os.NewFile(uintptr(fd), "datafd")
			} else {
				syscall.Close(fd) // more fds than the protocol allows
			}
		}
	}
	return n, f, nil
}

// fill reads until buf[:want] is complete or the deadline passes.
func (c *Conn) fill(have, want int) error {
	if have >= want {
		return nil
	}
	c.c.SetReadDeadline(time.Now().Add(commandDeadline))
	defer c.c.SetReadDeadline(time.Time{})
	if _, err := io.ReadFull(c.c, c.buf[have:want]); err != nil {
		return fmt.Errorf("%w: %v", ErrShortCommand, err)
	}
	return nil
}

// ReadRequest reads one command. It returns io.EOF when the client closed the
// connection between commands, and ErrShortCommand when a command was cut off.
func (c *Conn) ReadRequest() (*Request, error) {
	n, fd, err := c.first()
	if n == 0 {
		if fd != nil {
			fd.Close()
		}
		if err == nil {
			err = io.EOF
		}
		return nil, err
	}
	if err := c.fill(n, 4); err != nil {
		if fd != nil {
			fd.Close()
		}
		return nil, err
	}
	if n < 4 {
		n = 4
	}
	req := &Request{Cmd: Command(binary.BigEndian.Uint32(c.buf)), FD: fd}
	rule := bodySize(req.Cmd)
	need := rule.n
	if rule.shortIsError && n < 4+need {
		req.Malformed = true
		req.Body = make([]byte, need) // the fixed size, as for every request
		copy(req.Body, c.buf[4:n])
		return req, nil
	}
	if err := c.fill(n, 4+need); err != nil {
		req.closeFD()
		return nil, err
	}
	if n < 4+need {
		n = 4 + need
	}
	if rule.exact && n != 4+need {
		req.Malformed = true
	}
	req.Body = append([]byte(nil), c.buf[4:4+need]...)
	extra := c.buf[4+need : n]

	switch req.Cmd {
	case CmdHashData:
		l := binary.BigEndian.Uint32(req.Body)
		if l > maxHashData {
			req.Malformed, req.Drop = true, true // the payload cannot be skipped safely
			return req, nil
		}
		req.Blob, err = c.stream(extra, int(l))
	case CmdSetStateBlob:
		l := binary.BigEndian.Uint32(req.Body[8:])
		if l > MaxStateBlob {
			// Too large to accept; the rest of the stream cannot be
			// resynchronised, so the caller answers and drops the client.
			req.Malformed, req.Drop = true, true
			return req, nil
		}
		req.Blob, err = c.stream(extra, int(l))
	}
	if err != nil {
		req.closeFD()
		return nil, err
	}
	return req, nil
}

// stream reads a payload of length l, of which the first chunk already arrived.
func (c *Conn) stream(have []byte, l int) ([]byte, error) {
	p := make([]byte, l)
	k := copy(p, have)
	if k == l {
		return p, nil
	}
	// QEMU sends the SET_STATEBLOB header and body in separate writes, and a
	// large blob in several segments: allow a deadline per segment.
	for k < l {
		c.c.SetReadDeadline(time.Now().Add(commandDeadline))
		m, err := c.c.Read(p[k:])
		k += m
		if err != nil && k < l {
			c.c.SetReadDeadline(time.Time{})
			return nil, fmt.Errorf("%w: state blob: %v", ErrShortCommand, err)
		}
	}
	c.c.SetReadDeadline(time.Time{})
	return p, nil
}

func (r *Request) closeFD() {
	if r.FD != nil {
		r.FD.Close()
		r.FD = nil
	}
}

// Write sends one response with a single write, as every client expects.
func (c *Conn) Write(resp []byte) error {
	_, err := c.c.Write(resp)
	return err
}

// Result encodes a 4-byte result-only response (every error, and most
// successes). The control channel speaks TPM 1.2 style codes (tpmrc.TPM...).
func Result(code tpmrc.Code) []byte {
	return binary.BigEndian.AppendUint32(nil, uint32(code))
}

// U32s encodes a response made of big-endian u32 fields.
func U32s(v ...uint32) []byte {
	b := make([]byte, 0, 4*len(v))
	for _, x := range v {
		b = binary.BigEndian.AppendUint32(b, x)
	}
	return b
}

// U32 reads field i (a big-endian u32) of a request body.
func (r *Request) U32(i int) uint32 { return binary.BigEndian.Uint32(r.Body[4*i:]) }
