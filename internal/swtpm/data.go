package swtpm

import (
	"encoding/binary"
	"io"

	"vtpm/internal/tpmrc"
)

// NotInitialized is the TPM 2.0 answer to any data-channel command before
// CMD_INIT (TPM_RC_FAILURE). QEMU reads its tag to detect a TPM 2.0.
var NotInitialized = TPMResponse(tpmrc.TPMRCFailure)

const (
	tpmHeaderSize = 10
	// MaxCommand is libtpms' TPM 2.0 buffer size; with the 9-byte
	// send-command prefix it bounds a data-channel read, as in swtpm.
	MaxCommand  = 4096
	maxDataRead = MaxCommand + 9
	sendCommand = 8 // TPM_SEND_COMMAND of the TCG simulator prefix
	// CCSetLocality is the in-band locality command of the vtpm-proxy interface.
	CCSetLocality = 0x20001000
)

// DataRequest is one TPM command read off the data channel.
type DataRequest struct {
	Cmd []byte
	// Prefixed means the command came wrapped in the simulator's
	// TPM_SEND_COMMAND header, which carries a locality and wants a wrapped reply.
	Prefixed bool
	Locality uint8
}

// DataReader reads TPM commands from a stream or datagram connection.
type DataReader struct {
	r   io.Reader
	buf []byte
	// oneRead: a command is what one read returns (swtpm chardev), never
	// completed to its declared size.
	oneRead bool
}

// NewDataReader returns a reader over a data-channel connection.
func NewDataReader(r io.Reader) *DataReader {
	return &DataReader{r: r, buf: make([]byte, maxDataRead)}
}

// Read returns the next command. A datagram arrives whole in one read; on a
// stream the header is completed and then the declared size, so a command split
// across writes works too.
func (d *DataReader) Read() (*DataRequest, error) {
	n := 0
	for n < tpmHeaderSize {
		m, err := d.r.Read(d.buf[n:])
		n += m
		if err != nil {
			if n == 0 || err != io.EOF {
				return nil, err
			}
			return nil, io.ErrUnexpectedEOF
		}
	}
	b := d.buf
	req := &DataRequest{}
	off, size := 0, int(binary.BigEndian.Uint32(b[2:6]))
	tag := binary.BigEndian.Uint16(b)
	if tag != 0x8001 && tag != 0x8002 && binary.BigEndian.Uint32(b) == sendCommand {
		req.Prefixed, req.Locality = true, b[4]
		off, size = 9, int(binary.BigEndian.Uint32(b[5:9]))
	}
	if d.oneRead {
		req.Cmd = append([]byte(nil), b[off:n]...)
		return req, nil
	}
	// Complete the command when its declared size is sane; otherwise hand over
	// what arrived and let the TPM reject it, as swtpm does.
	if size >= tpmHeaderSize && off+size <= len(b) && n < off+size {
		if _, err := io.ReadFull(d.r, b[n:off+size]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF // cut off inside a command, not a clean close
			}
			return nil, err
		}
		n = off + size
	}
	end := n
	if off+size <= n && size >= tpmHeaderSize {
		end = off + size
	}
	req.Cmd = append([]byte(nil), b[off:end]...)
	return req, nil
}

// WrapResponse frames a response for a prefixed request: u32 length, the
// response, and a u32 zero acknowledgement.
func WrapResponse(resp []byte) []byte {
	out := make([]byte, 0, len(resp)+8)
	out = binary.BigEndian.AppendUint32(out, uint32(len(resp)))
	out = append(out, resp...)
	return binary.BigEndian.AppendUint32(out, 0)
}

// TPMResponse builds a bare TPM 2.0 response (TPM_ST_NO_SESSIONS, 10
// bytes) with the given response code.
func TPMResponse(rc tpmrc.Code) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, tpmHeaderSize, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[6:], uint32(rc))
	return b
}
