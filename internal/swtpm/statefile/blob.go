package statefile

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"fmt"

	"vtpm/internal/tpmrc"
)

// Blob header constants (version 2 format).
const (
	headerVersion    = 2
	headerMinVersion = 1
	headerSize       = 10
)

// Header flags.
const (
	FlagEncrypted          uint16 = 0x01
	FlagMigrationEncrypted uint16 = 0x02
	FlagMigrationData      uint16 = 0x04
	FlagEncrypted256       uint16 = 0x08
	FlagMigration256       uint16 = 0x10
)

// TLV tags.
const (
	tagData                     uint16 = 1
	tagEncryptedData            uint16 = 2
	tagHMAC                     uint16 = 3
	tagMigrationData            uint16 = 4
	tagEncryptedMigrationData   uint16 = 5
	tagIVEncryptedData          uint16 = 6
	tagIVEncryptedMigrationData uint16 = 7
	tlvHeaderSize                      = 6
	cbcIVSize                          = aes.BlockSize
)

type header struct {
	version uint8
	flags   uint16
}

// parseHeader checks a version 2 blob header and returns the payload.
func parseHeader(data []byte) (header, []byte, error) {
	if len(data) < headerSize {
		return header{}, nil, fmt.Errorf("blob of %d bytes is shorter than its %d-byte header: %w", len(data), headerSize, tpmrc.TPMBadParameter)
	}
	if tot := binary.BigEndian.Uint32(data[6:]); int64(tot) != int64(len(data)) {
		return header{}, nil, fmt.Errorf("blob header says %d bytes, blob has %d: %w", tot, len(data), tpmrc.TPMBadParameter)
	}
	if data[1] > headerVersion {
		return header{}, nil, fmt.Errorf("blob needs format version %d, newer than supported %d: %w", data[1], headerVersion, tpmrc.TPMBadVersion)
	}
	if hs := binary.BigEndian.Uint16(data[2:]); hs != headerSize {
		return header{}, nil, fmt.Errorf("blob header size is %d, want %d: %w", hs, headerSize, tpmrc.TPMBadDataSize)
	}
	return header{version: data[0], flags: binary.BigEndian.Uint16(data[4:])}, data[headerSize:], nil
}

func appendHeader(b []byte, flags uint16, payloadLen int) []byte {
	b = append(b, headerVersion, headerMinVersion)
	b = binary.BigEndian.AppendUint16(b, headerSize)
	b = binary.BigEndian.AppendUint16(b, flags)
	return binary.BigEndian.AppendUint32(b, uint32(headerSize+payloadLen))
}

func appendTLV(b []byte, tag uint16, value []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, tag)
	b = binary.BigEndian.AppendUint32(b, uint32(len(value)))
	return append(b, value...)
}

// findTLV returns the value of the first record with tag. Like swtpm, it
// stops at a record that runs past the end.
func findTLV(data []byte, tag uint16) ([]byte, bool) {
	for len(data) >= tlvHeaderSize {
		t := binary.BigEndian.Uint16(data)
		n := binary.BigEndian.Uint32(data[2:])
		data = data[tlvHeaderSize:]
		if uint64(n) > uint64(len(data)) {
			return nil, false
		}
		if t == tag {
			return data[:n], true
		}
		data = data[n:]
	}
	return nil, false
}

// encryptTLVs produces the three records ct, HMAC and IV. The IV is as long
// as the key but only its first 16 bytes feed CBC, and padding is to a
// multiple of the key length: both are swtpm's on-disk conventions.
func encryptTLVs(plain []byte, key *Key, tagCT, tagIV uint16) ([]byte, error) {
	if err := key.check(); err != nil {
		return nil, err
	}
	kl := len(key.Bytes)
	iv := make([]byte, kl)
	if _, err := rand.Read(iv); err != nil {
		return nil, fmt.Errorf("generating IV: %w", tpmrc.TPMEncryptError)
	}
	pad := kl - len(plain)%kl
	ct := make([]byte, len(plain)+pad)
	copy(ct, plain)
	for i := len(plain); i < len(ct); i++ {
		ct[i] = byte(pad)
	}
	block, err := aes.NewCipher(key.Bytes)
	if err != nil {
		return nil, fmt.Errorf("creating AES cipher: %v: %w", err, tpmrc.TPMEncryptError)
	}
	cipher.NewCBCEncrypter(block, iv[:cbcIVSize]).CryptBlocks(ct, ct)

	out := make([]byte, 0, 3*tlvHeaderSize+len(ct)+sha256.Size+kl)
	out = appendTLV(out, tagCT, ct)
	out = appendTLV(out, tagHMAC, macOf(key, ct, iv))
	return appendTLV(out, tagIV, iv), nil
}

func macOf(key *Key, ct, iv []byte) []byte {
	m := hmac.New(sha256.New, key.Bytes)
	m.Write(ct)
	m.Write(iv)
	return m.Sum(nil)
}

// decryptTLVs reverses encryptTLVs. A missing IV record means a zero IV,
// as written by old swtpm versions.
func decryptTLVs(payload []byte, key *Key, tagCT, tagIV uint16) ([]byte, error) {
	if err := key.check(); err != nil {
		return nil, err
	}
	ct, ok := findTLV(payload, tagCT)
	if !ok {
		return nil, fmt.Errorf("no encrypted data record (tag %d) in blob; is it really encrypted?: %w", tagCT, tpmrc.TPMFail)
	}
	mac, ok := findTLV(payload, tagHMAC)
	if !ok {
		return nil, fmt.Errorf("no HMAC record in encrypted blob: %w", tpmrc.TPMFail)
	}
	iv, hasIV := findTLV(payload, tagIV)
	if hasIV && len(iv) < cbcIVSize {
		return nil, fmt.Errorf("IV of %d bytes is shorter than %d: %w", len(iv), cbcIVSize, tpmrc.TPMDecryptError)
	}
	if !hmac.Equal(mac, macOf(key, ct, iv)) {
		return nil, fmt.Errorf("HMAC mismatch: wrong key or corrupted data: %w", tpmrc.TPMDecryptError)
	}
	cbcIV := make([]byte, cbcIVSize)
	if hasIV {
		copy(cbcIV, iv)
	}
	return cbcDecrypt(key, cbcIV, ct)
}

// cbcDecrypt decrypts and strips padding whose unit is the key length.
func cbcDecrypt(key *Key, iv, ct []byte) ([]byte, error) {
	if len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
		return nil, fmt.Errorf("ciphertext of %d bytes is not a whole number of AES blocks: %w", len(ct), tpmrc.TPMDecryptError)
	}
	block, err := aes.NewCipher(key.Bytes)
	if err != nil {
		return nil, fmt.Errorf("creating AES cipher: %v: %w", err, tpmrc.TPMDecryptError)
	}
	plain := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(plain, ct)
	pad := int(plain[len(plain)-1])
	if pad < 1 || pad > len(key.Bytes) || pad > len(plain) {
		return nil, fmt.Errorf("bad padding length %d: wrong key or corrupted data: %w", pad, tpmrc.TPMDecryptError)
	}
	for _, b := range plain[len(plain)-pad:] {
		if int(b) != pad {
			return nil, fmt.Errorf("bad padding bytes: wrong key or corrupted data: %w", tpmrc.TPMDecryptError)
		}
	}
	return plain[:len(plain)-pad], nil
}

// checkKeySize compares the header's 256-bit flag with the configured key.
func checkKeySize(flags, flag256 uint16, key *Key) error {
	want := 128
	if flags&flag256 != 0 {
		want = 256
	}
	if len(key.Bytes)*8 != want {
		return fmt.Errorf("wrong decryption key: blob needs a %d-bit key, configured key is %d-bit: %w",
			want, len(key.Bytes)*8, tpmrc.TPMBadKeyProperty)
	}
	return nil
}

// decodeLayer returns the plain content of one layer: the encrypted
// records when key is set, else the plain record.
func decodeLayer(payload []byte, h header, key *Key, tagPlain, tagCT, tagIV, flag256 uint16) ([]byte, error) {
	if key == nil {
		v, ok := findTLV(payload, tagPlain)
		if !ok {
			return nil, fmt.Errorf("no plain data record (tag %d) in blob; is it encrypted and the key missing?: %w", tagPlain, tpmrc.TPMFail)
		}
		return v, nil
	}
	if err := checkKeySize(h.flags, flag256, key); err != nil {
		return nil, err
	}
	return decryptTLVs(payload, key, tagCT, tagIV)
}

// DecodeFile returns the libtpms state held in a swtpm state file.
//
// As swtpm does, when key is set it always decrypts, so a plain file read
// with a key fails; a file without a valid header is read as the
// headerless version 1 format. Errors carry the tpmrc.Code swtpm would answer with.
func DecodeFile(data []byte, key *Key) ([]byte, error) {
	h, payload, err := parseHeader(data)
	if err != nil {
		return decodeV1(data, key)
	}
	if h.version == 1 {
		return decodeV1(payload, key)
	}
	plain, err := decodeLayer(payload, h, key, tagData, tagEncryptedData, tagIVEncryptedData, FlagEncrypted256)
	if err != nil {
		return nil, fmt.Errorf("decoding state file: %w", err)
	}
	return bytes.Clone(plain), nil
}

// decodeV1 reads the headerless legacy format: raw data, or with a key
// AES-CBC(zero IV) of SHA256(data)||data and no HMAC.
func decodeV1(data []byte, key *Key) ([]byte, error) {
	if key == nil {
		return bytes.Clone(data), nil
	}
	if err := key.check(); err != nil {
		return nil, err
	}
	plain, err := cbcDecrypt(key, make([]byte, cbcIVSize), data)
	if err != nil {
		return nil, fmt.Errorf("decoding version 1 data: %w", err)
	}
	if len(plain) < sha256.Size {
		return nil, fmt.Errorf("decoding version 1 data: too short for its hash: %w", tpmrc.TPMDecryptError)
	}
	sum := sha256.Sum256(plain[sha256.Size:])
	if subtle.ConstantTimeCompare(sum[:], plain[:sha256.Size]) != 1 {
		return nil, fmt.Errorf("decoding version 1 data: hash mismatch, wrong key or corrupted data: %w", tpmrc.TPMDecryptError)
	}
	return plain[sha256.Size:], nil
}

// EncodeFile returns a swtpm state file holding plain: a header plus a plain
// record, or with key the encrypted records in swtpm's order (2, 3, 6).
func EncodeFile(plain []byte, key *Key) ([]byte, error) {
	if key == nil {
		out := appendHeader(make([]byte, 0, headerSize+tlvHeaderSize+len(plain)), 0, tlvHeaderSize+len(plain))
		return appendTLV(out, tagData, plain), nil
	}
	payload, err := encryptTLVs(plain, key, tagEncryptedData, tagIVEncryptedData)
	if err != nil {
		return nil, fmt.Errorf("encoding state file: %w", err)
	}
	flags := FlagEncrypted
	if key.is256() {
		flags |= FlagEncrypted256
	}
	return append(appendHeader(make([]byte, 0, headerSize+len(payload)), flags, len(payload)), payload...), nil
}
