package statefile

import (
	"encoding/binary"
	"fmt"
	"math"

	"vtpm/internal/tpmrc"
)

// TagVTPM tags vtpm's own record in a migration blob's outer payload
// ("vt"). swtpm finds the records it knows by tag and passes over others.
const TagVTPM uint16 = 0x7674

// AppendRecord returns blob (a migration blob from EncodeMigration) with
// one more TLV record, tag and value, at the end of its payload.
func AppendRecord(blob []byte, tag uint16, value []byte) ([]byte, error) {
	if _, _, err := parseHeader(blob); err != nil {
		return nil, err
	}
	total := len(blob) + tlvHeaderSize + len(value)
	if uint64(total) > math.MaxUint32 {
		return nil, fmt.Errorf("migration blob of %d bytes is too large: %w", total, tpmrc.TPMBadParameter)
	}
	out := make([]byte, 0, total)
	out = append(out, blob...)
	out = appendTLV(out, tag, value)
	binary.BigEndian.PutUint32(out[6:], uint32(total))
	return out, nil
}

// CutRecord splits off blob's last record when it has tag: rest is blob
// without it (a migration blob as EncodeMigration made it), value is the
// record's content. ok is false, and rest is blob, when blob is not a
// well-formed blob ending in such a record.
func CutRecord(blob []byte, tag uint16) (rest, value []byte, ok bool) {
	if _, _, err := parseHeader(blob); err != nil {
		return blob, nil, false
	}
	off := headerSize
	for len(blob)-off >= tlvHeaderSize {
		t := binary.BigEndian.Uint16(blob[off:])
		n := binary.BigEndian.Uint32(blob[off+2:])
		end := uint64(off) + tlvHeaderSize + uint64(n)
		if end > uint64(len(blob)) {
			return blob, nil, false
		}
		if end == uint64(len(blob)) && t == tag {
			rest = append([]byte(nil), blob[:off]...)
			binary.BigEndian.PutUint32(rest[6:], uint32(off))
			return rest, blob[off+tlvHeaderSize:], true
		}
		off = int(end)
	}
	return blob, nil, false
}
