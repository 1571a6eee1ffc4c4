package statefile

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"slices"
	"testing"

	"vtpm/internal/tpmrc"
)

var (
	key128 = &Key{Bytes: bytes.Repeat([]byte{0x11}, 16)}
	key256 = &Key{Bytes: bytes.Repeat([]byte{0x22}, 32)}
)

func testPlain(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	return b
}

// tlvs splits a payload into its records, failing on trailing garbage.
func tlvs(t *testing.T, payload []byte) (tags []uint16, values [][]byte) {
	t.Helper()
	for len(payload) > 0 {
		if len(payload) < tlvHeaderSize {
			t.Fatalf("truncated TLV header")
		}
		n := binary.BigEndian.Uint32(payload[2:])
		tags = append(tags, binary.BigEndian.Uint16(payload))
		values = append(values, payload[tlvHeaderSize:tlvHeaderSize+n])
		payload = payload[tlvHeaderSize+n:]
	}
	return tags, values
}

func TestEncodeFileLayout(t *testing.T) {
	tests := []struct {
		name      string
		key       *Key
		plainLen  int
		wantFlags uint16
		wantTags  []uint16
		wantCT    int
	}{
		{"plain", nil, 40, 0, []uint16{1}, 40},
		{"aes128 pads to 16", key128, 40, 0x01, []uint16{2, 3, 6}, 48},
		{"aes256 pads to 32", key256, 40, 0x09, []uint16{2, 3, 6}, 64},
		{"aes128 full pad block", key128, 32, 0x01, []uint16{2, 3, 6}, 48},
		{"aes256 full pad block", key256, 32, 0x09, []uint16{2, 3, 6}, 64},
		{"aes128 swtpm sample size", key128, 1299, 0x01, []uint16{2, 3, 6}, 1312},
		{"aes256 empty", key256, 0, 0x09, []uint16{2, 3, 6}, 32},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plain := testPlain(tt.plainLen)
			f, err := EncodeFile(plain, tt.key)
			if err != nil {
				t.Fatal(err)
			}
			wantHdr := []byte{2, 1, 0, 10, 0, byte(tt.wantFlags)}
			if !bytes.Equal(f[:6], wantHdr) || int(binary.BigEndian.Uint32(f[6:])) != len(f) {
				t.Fatalf("header % x, want % x + totlen %d", f[:10], wantHdr, len(f))
			}
			tags, values := tlvs(t, f[10:])
			if !slices.Equal(tags, tt.wantTags) {
				t.Fatalf("TLV tags %v, want %v", tags, tt.wantTags)
			}
			if len(values[0]) != tt.wantCT {
				t.Fatalf("data record is %d bytes, want %d", len(values[0]), tt.wantCT)
			}
			if tt.key != nil {
				if len(values[1]) != 32 {
					t.Errorf("HMAC is %d bytes, want 32", len(values[1]))
				}
				if len(values[2]) != len(tt.key.Bytes) {
					t.Errorf("IV is %d bytes, want the key length %d", len(values[2]), len(tt.key.Bytes))
				}
			}
			got, err := DecodeFile(f, tt.key)
			if err != nil {
				t.Fatalf("DecodeFile: %v", err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatal("round trip changed the data")
			}
		})
	}
}

// buildEncrypted makes a v2 encrypted file by hand, independently of
// encryptTLVs, with a chosen IV (nil: no IV record, zero IV).
func buildEncrypted(t *testing.T, plain []byte, key *Key, iv []byte, flags uint16) []byte {
	t.Helper()
	kl := len(key.Bytes)
	pad := kl - len(plain)%kl
	ct := append(bytes.Clone(plain), bytes.Repeat([]byte{byte(pad)}, pad)...)
	block, _ := aes.NewCipher(key.Bytes)
	cbcIV := make([]byte, 16)
	copy(cbcIV, iv)
	cipher.NewCBCEncrypter(block, cbcIV).CryptBlocks(ct, ct)
	payload := appendTLV(nil, tagEncryptedData, ct)
	payload = appendTLV(payload, tagHMAC, macOf(key, ct, iv))
	if iv != nil {
		payload = appendTLV(payload, tagIVEncryptedData, iv)
	}
	return append(appendHeader(nil, flags, len(payload)), payload...)
}

func TestDecodeFileAccepts(t *testing.T) {
	plain := testPlain(100)
	v1 := func(key *Key) []byte {
		sum := sha256.Sum256(plain)
		data := append(sum[:], plain...)
		kl := len(key.Bytes)
		pad := kl - len(data)%kl
		data = append(data, bytes.Repeat([]byte{byte(pad)}, pad)...)
		block, _ := aes.NewCipher(key.Bytes)
		cipher.NewCBCEncrypter(block, make([]byte, 16)).CryptBlocks(data, data)
		return data
	}
	tests := []struct {
		name string
		file []byte
		key  *Key
	}{
		{"32-byte IV with a 128-bit key (0.7.1 IV bug output)", buildEncrypted(t, plain, key128, bytes.Repeat([]byte{9}, 32), 0x01), key128},
		{"no IV record means zero IV", buildEncrypted(t, plain, key256, nil, 0x09), key256},
		{"headerless version 1 plain", plain, nil},
		{"headerless version 1 encrypted", v1(key128), key128},
		{"headerless version 1 encrypted aes256", v1(key256), key256},
		{"records searched by tag, unknown ones skipped", func() []byte {
			p := appendTLV(appendTLV(nil, 99, []byte("xx")), tagData, plain)
			return append(appendHeader(nil, 0, len(p)), p...)
		}(), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeFile(tt.file, tt.key)
			if err != nil {
				t.Fatalf("DecodeFile: %v", err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatalf("decoded % x..., want % x...", got[:min(8, len(got))], plain[:8])
			}
		})
	}
}

func TestDecodeFileErrors(t *testing.T) {
	plain := testPlain(100)
	enc128, _ := EncodeFile(plain, key128)
	enc256, _ := EncodeFile(plain, key256)
	plainFile, _ := EncodeFile(plain, nil)
	tampered := bytes.Clone(enc128)
	tampered[20] ^= 1
	// A broken pad byte under a valid HMAC.
	var badPad []byte
	{
		ct := append(bytes.Clone(plain), bytes.Repeat([]byte{12}, 11)...)
		ct = append(ct, 99)
		block, _ := aes.NewCipher(key128.Bytes)
		iv := bytes.Repeat([]byte{1}, 16)
		cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, ct)
		p := appendTLV(nil, tagEncryptedData, ct)
		p = appendTLV(p, tagHMAC, macOf(key128, ct, iv))
		p = appendTLV(p, tagIVEncryptedData, iv)
		badPad = append(appendHeader(nil, 0x01, len(p)), p...)
	}
	tests := []struct {
		name string
		file []byte
		key  *Key
		want tpmrc.Code
	}{
		{"wrong key", enc128, &Key{Bytes: bytes.Repeat([]byte{0x33}, 16)}, tpmrc.TPMDecryptError},
		{"tampered ciphertext", tampered, key128, tpmrc.TPMDecryptError},
		{"bad padding under valid HMAC", badPad, key128, tpmrc.TPMDecryptError},
		{"256-bit file, 128-bit key", enc256, key128, tpmrc.TPMBadKeyProperty},
		{"128-bit file, 256-bit key", enc128, key256, tpmrc.TPMBadKeyProperty},
		{"plain file with a key configured", plainFile, key128, tpmrc.TPMFail},
		{"encrypted file without a key", enc128, nil, tpmrc.TPMFail},
		{"version 1 garbage with a key", []byte("not a header and not a block mult"), key128, tpmrc.TPMDecryptError},
		{"invalid key length", enc128, &Key{Bytes: make([]byte, 24)}, tpmrc.TPMBadKeyProperty},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeFile(tt.file, tt.key)
			if got := tpmrc.Of(err); got != tt.want {
				t.Fatalf("DecodeFile error %v has result %v, want %v", err, got, tt.want)
			}
		})
	}
}

func TestMigrationRoundTripAndFlags(t *testing.T) {
	plain := testPlain(300)
	tests := []struct {
		name           string
		fileKey        *Key
		migKey         *Key
		decrypted      bool
		wantFlags      uint16
		wantStateFlags uint32
	}{
		{"no keys", nil, nil, true, 0x04, 0},
		{"no keys, not decrypted", nil, nil, false, 0x04, 0},
		{"both aes256, decrypted (QEMU)", key256, key256, true, 0x16, 0},
		{"both aes256, not decrypted", key256, key256, false, 0x1F, 2},
		{"aes128 file key, not decrypted", key128, nil, false, 0x05, 2},
		{"aes128 migration key", nil, key128, true, 0x06, 0},
		{"mixed aes256 file, aes128 migration", key256, key128, false, 0x0F, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			blob, sf, err := EncodeMigration(plain, tt.fileKey, tt.migKey, tt.decrypted)
			if err != nil {
				t.Fatal(err)
			}
			if got := binary.BigEndian.Uint16(blob[4:]); got != tt.wantFlags || sf != tt.wantStateFlags {
				t.Fatalf("flags %#x, state flags %#x; want %#x, %#x", got, sf, tt.wantFlags, tt.wantStateFlags)
			}
			got, err := DecodeMigration(blob, sf, tt.fileKey, tt.migKey)
			if err != nil {
				t.Fatalf("DecodeMigration: %v", err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatal("round trip changed the data")
			}
		})
	}
}

func TestDecodeMigrationEmpty(t *testing.T) {
	for _, blob := range [][]byte{nil, appendHeader(nil, FlagMigrationData, 0)} {
		got, err := DecodeMigration(blob, 0, nil, nil)
		if err != nil || got != nil {
			t.Errorf("DecodeMigration(% x) = %v, %v; want nil, nil", blob, got, err)
		}
	}
}

func TestDecodeMigrationErrors(t *testing.T) {
	plain := testPlain(50)
	migEnc, _, _ := EncodeMigration(plain, nil, key256, true)
	fileEnc, _, _ := EncodeMigration(plain, key128, nil, false)
	plainBlob, _, _ := EncodeMigration(plain, nil, nil, true)
	stateFile, _ := EncodeFile(plain, nil)
	withHeader := func(b []byte, off int, v byte) []byte { b = bytes.Clone(b); b[off] = v; return b }
	tests := []struct {
		name    string
		blob    []byte
		sf      uint32
		fileKey *Key
		migKey  *Key
		want    tpmrc.Code
	}{
		{"migration-encrypted, no migration key", migEnc, 0, nil, nil, tpmrc.TPMKeyNotFound},
		{"migration-encrypted, wrong migration key", migEnc, 0, nil, &Key{Bytes: make([]byte, 32)}, tpmrc.TPMDecryptError},
		{"migration-encrypted, wrong migration key size", migEnc, 0, nil, key128, tpmrc.TPMBadKeyProperty},
		{"file-encrypted inner, no file key", fileEnc, 0, nil, nil, tpmrc.TPMKeyNotFound},
		{"file-encrypted inner, wrong file key", fileEnc, 0, &Key{Bytes: make([]byte, 16)}, nil, tpmrc.TPMDecryptError},
		{"state flag forces inner decryption", plainBlob, StateFlagEncrypted, key128, nil, tpmrc.TPMFail},
		{"min_version too new", withHeader(plainBlob, 1, 3), 0, nil, nil, tpmrc.TPMBadVersion},
		{"header size wrong", withHeader(plainBlob, 3, 12), 0, nil, nil, tpmrc.TPMBadDataSize},
		{"totlen wrong", withHeader(plainBlob, 9, 0xFF), 0, nil, nil, tpmrc.TPMBadParameter},
		{"short", []byte{2, 1, 0}, 0, nil, nil, tpmrc.TPMBadParameter},
		{"a state file is not a migration blob", stateFile, 0, nil, nil, tpmrc.TPMFail},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeMigration(tt.blob, tt.sf, tt.fileKey, tt.migKey)
			if got := tpmrc.Of(err); got != tt.want {
				t.Fatalf("DecodeMigration error %v has result %v, want %v", err, got, tt.want)
			}
		})
	}
}

func TestMigrationAcceptsPlainBlobWithMigrationKey(t *testing.T) {
	plain := testPlain(64)
	blob, _, err := EncodeMigration(plain, nil, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeMigration(blob, 0, key256, key256)
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("plain blob into an encrypted setup: %v", err)
	}
}

func FuzzDecodeFile(f *testing.F) {
	plain := testPlain(40)
	for _, k := range []*Key{nil, key128, key256} {
		enc, _ := EncodeFile(plain, k)
		f.Add(enc, uint8(0))
		blob, _, _ := EncodeMigration(plain, k, k, false)
		f.Add(blob, uint8(1))
	}
	f.Add([]byte{}, uint8(2))
	f.Fuzz(func(t *testing.T, data []byte, which uint8) {
		keys := []*Key{nil, key128, key256}
		k := keys[int(which)%3]
		if out, err := DecodeFile(data, k); err == nil && k != nil && len(out) > len(data) {
			t.Fatalf("decrypted %d bytes from a %d-byte file", len(out), len(data))
		}
		DecodeMigration(data, uint32(which>>2), k, keys[int(which>>4)%3])
	})
}

// TestDecodeMigrationVersion1: a migration blob with header version 1 (as
// swtpm 0.7.1's tests load with swtpm_ioctl --load) holds each layer as the
// whole payload: AES-CBC(zero IV) of SHA256(data)||data under its key.
func TestDecodeMigrationVersion1(t *testing.T) {
	plain := testPlain(100)
	v1 := func(key *Key, data []byte) []byte {
		sum := sha256.Sum256(data)
		data = append(sum[:], data...)
		kl := len(key.Bytes)
		pad := kl - len(data)%kl
		data = append(data, bytes.Repeat([]byte{byte(pad)}, pad)...)
		block, _ := aes.NewCipher(key.Bytes)
		cipher.NewCBCEncrypter(block, make([]byte, 16)).CryptBlocks(data, data)
		return data
	}
	blob := func(flags uint16, payload []byte) []byte {
		b := append(appendHeader(nil, flags, len(payload)), payload...)
		b[0], b[1] = 1, 1
		return b
	}
	tests := []struct {
		name            string
		blob            []byte
		fileKey, migKey *Key
		wantErr         bool
	}{
		{"migration key", blob(FlagMigrationEncrypted, v1(key256, plain)), nil, key256, false},
		{"migration and state keys", blob(FlagMigrationEncrypted|FlagEncrypted, v1(key256, v1(key128, plain))), key128, key256, false},
		{"plain", blob(0, plain), nil, nil, false},
		{"wrong migration key", blob(FlagMigrationEncrypted, v1(key256, plain)), nil, &Key{Bytes: bytes.Repeat([]byte{7}, 32)}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeMigration(tt.blob, 0, tt.fileKey, tt.migKey)
			if tt.wantErr {
				if err == nil {
					t.Fatal("DecodeMigration accepted a blob under another key")
				}
				return
			}
			if err != nil {
				t.Fatalf("DecodeMigration: %v", err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatalf("decoded % x..., want % x...", got[:min(8, len(got))], plain[:8])
			}
		})
	}
}
