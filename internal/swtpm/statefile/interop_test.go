package statefile

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"vtpm/internal/tpmrc"
)

// keyCase is one --key/--migration-key configuration: the option string
// (with KEYFILE standing for the key material's path) and that material.
type keyCase struct {
	name     string
	option   string
	material []byte
	wantBits int // 0: no key
}

var keyCases = []keyCase{
	{name: "no-key"},
	{name: "aes128-hex-file", option: "file=KEYFILE,mode=aes-128-cbc",
		material: []byte("0x00112233445566778899aabbccddeeff\n"), wantBits: 128},
	{name: "aes256-pwdfile-pbkdf2", option: "pwdfile=KEYFILE,mode=aes-256-cbc",
		material: []byte("correct horse battery staple\n"), wantBits: 256},
	{name: "aes128-pwdfile-sha512", option: "pwdfile=KEYFILE,kdf=sha512",
		material: []byte("another passphrase"), wantBits: 128},
	{name: "aes256-binary-file", option: "file=KEYFILE,format=binary,mode=aes-256-cbc",
		material: bytes.Repeat([]byte{0xA5, 0x5A, 0x01, 0xFE}, 8), wantBits: 256},
}

// materialize writes the key material and returns swtpm's arguments for
// flag and our parsed key (nil for no key).
func (k keyCase) materialize(t *testing.T, flag string) ([]string, *Key) {
	t.Helper()
	if k.option == "" {
		return nil, nil
	}
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, k.material, 0o600); err != nil {
		t.Fatal(err)
	}
	opt := string(bytes.ReplaceAll([]byte(k.option), []byte("KEYFILE"), []byte(p)))
	key, err := ParseKeyOption(opt)
	if err != nil {
		t.Fatalf("ParseKeyOption(%q): %v", opt, err)
	}
	if got := len(key.Bytes) * 8; got != k.wantBits {
		t.Fatalf("key is %d bits, want %d", got, k.wantBits)
	}
	return []string{flag, opt}, key
}

func randomNV(t *testing.T) []byte {
	t.Helper()
	b := make([]byte, 32)
	rand.Read(b)
	return b
}

// otherKey returns a key of the same size as k with different bytes.
func otherKey(k *Key) *Key {
	b := bytes.Clone(k.Bytes)
	b[0] ^= 0xFF
	return &Key{Bytes: b}
}

func TestStateFileInteropWithSwtpm(t *testing.T) {
	requireSwtpm(t)
	for _, kc := range keyCases {
		t.Run(kc.name, func(t *testing.T) {
			args, key := kc.materialize(t, "--key")
			nv := randomNV(t)

			// swtpm writes, we read.
			dir := shortTempDir(t)
			sw := startSwtpm(t, dir, true, args...)
			nvDefineWrite(t, sw.dial(t), nv)
			sw.shutdown(t)

			raw, err := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
			if err != nil {
				t.Fatal(err)
			}
			wantFlags := uint16(0)
			if key != nil {
				wantFlags = FlagEncrypted
				if kc.wantBits == 256 {
					wantFlags |= FlagEncrypted256
				}
			}
			if raw[0] != 2 || raw[1] != 1 || binary.BigEndian.Uint16(raw[4:]) != wantFlags {
				t.Fatalf("swtpm header % x, want version 2, min 1, flags %#x", raw[:10], wantFlags)
			}
			plain, err := DecodeFile(raw, key)
			if err != nil {
				t.Fatalf("DecodeFile of swtpm's permall: %v", err)
			}
			if !bytes.Contains(plain, nv) {
				t.Fatalf("decoded permall (%d bytes) does not contain the NV data written", len(plain))
			}
			if key != nil {
				if _, err := DecodeFile(raw, otherKey(key)); tpmrc.Of(err) != tpmrc.TPMDecryptError {
					t.Errorf("DecodeFile with wrong key: got %v, want %v", err, tpmrc.TPMDecryptError)
				}
			}

			// We write (through the directory store), swtpm reads.
			dir2 := shortTempDir(t)
			d, err := OpenDir(dir2, key, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			if err := d.Store("permall", plain); err != nil {
				t.Fatalf("Store: %v", err)
			}
			sw2 := startSwtpm(t, dir2, true, args...)
			if got := nvRead(t, sw2.dial(t), len(nv)); !bytes.Equal(got, nv) {
				t.Fatalf("swtpm read NV %x from our file, want %x", got, nv)
			}
			sw2.shutdown(t)
		})
	}
}

func TestMigrationInteropWithSwtpm(t *testing.T) {
	requireSwtpm(t)
	cases := []struct {
		name    string
		fileKey keyCase
		migKey  keyCase
	}{
		{"no-keys", keyCases[0], keyCases[0]},
		{"migration-key-only", keyCases[0], keyCases[2]},
		{"file-key-only", keyCases[1], keyCases[0]},
		{"aes128-file-aes256-migration", keyCases[1], keyCases[4]},
		{"libvirt-style-aes256-both", keyCases[2], keyCases[2]},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fileArgs, fileKey := tc.fileKey.materialize(t, "--key")
			migArgs, migKey := tc.migKey.materialize(t, "--migration-key")
			keyArgs := append(fileArgs, migArgs...)
			nv := randomNV(t)

			// swtpm saves (swtpm_ioctl asks for DECRYPTED), we decode.
			dir := shortTempDir(t)
			sw := startSwtpm(t, dir, true, keyArgs...)
			nvDefineWrite(t, sw.dial(t), nv)
			blobPath := filepath.Join(dir, "perm.blob")
			if out, err := sw.ioctl("--save", "permanent", blobPath); err != nil {
				t.Fatalf("swtpm_ioctl --save: %v: %s", err, out)
			}
			sw.shutdown(t)
			blob, err := os.ReadFile(blobPath)
			if err != nil {
				t.Fatal(err)
			}
			wantFlags := FlagMigrationData
			if migKey != nil {
				wantFlags |= FlagMigrationEncrypted
				if migKey.is256() {
					wantFlags |= FlagMigration256
				}
			}
			if got := binary.BigEndian.Uint16(blob[4:]); got != wantFlags {
				t.Fatalf("swtpm blob flags %#x, want %#x", got, wantFlags)
			}
			plain, err := DecodeMigration(blob, 0, fileKey, migKey)
			if err != nil {
				t.Fatalf("DecodeMigration of swtpm's blob: %v", err)
			}
			if !bytes.Contains(plain, nv) {
				t.Fatal("decoded migration blob does not contain the NV data written")
			}
			if migKey != nil {
				if _, err := DecodeMigration(blob, 0, fileKey, nil); tpmrc.Of(err) != tpmrc.TPMKeyNotFound {
					t.Errorf("without migration key: got %v, want %v", err, tpmrc.TPMKeyNotFound)
				}
				if _, err := DecodeMigration(blob, 0, fileKey, otherKey(migKey)); tpmrc.Of(err) != tpmrc.TPMDecryptError {
					t.Errorf("with wrong migration key: got %v, want %v", err, tpmrc.TPMDecryptError)
				}
			}

			// We encode, swtpm loads into a stopped TPM.
			for _, decrypted := range []bool{true, false} {
				ours, _, err := EncodeMigration(plain, fileKey, migKey, decrypted)
				if err != nil {
					t.Fatalf("EncodeMigration(decrypted=%v): %v", decrypted, err)
				}
				p := filepath.Join(t.TempDir(), "ours.blob")
				if err := os.WriteFile(p, ours, 0o600); err != nil {
					t.Fatal(err)
				}
				sw2 := startSwtpm(t, shortTempDir(t), false, keyArgs...)
				for _, args := range [][]string{{"--stop"}, {"--load", "permanent", p}, {"-i"}} {
					if out, err := sw2.ioctl(args...); err != nil {
						t.Fatalf("swtpm_ioctl %v (decrypted=%v): %v: %s", args, decrypted, err, out)
					}
				}
				tpm := sw2.dial(t)
				startup(t, tpm)
				if got := nvRead(t, tpm, len(nv)); !bytes.Equal(got, nv) {
					t.Fatalf("swtpm read NV %x from our blob (decrypted=%v), want %x", got, decrypted, nv)
				}
				sw2.shutdown(t)
			}

			// swtpm refuses our migration-encrypted blob without the key,
			// with the code we return ourselves.
			if migKey != nil {
				ours, _, err := EncodeMigration(plain, fileKey, migKey, true)
				if err != nil {
					t.Fatal(err)
				}
				p := filepath.Join(t.TempDir(), "ours.blob")
				os.WriteFile(p, ours, 0o600)
				sw3 := startSwtpm(t, shortTempDir(t), false, fileArgs...)
				sw3.ioctl("--stop")
				out, _ := sw3.ioctl("--load", "permanent", p)
				if got, want := swtpmResult(out), fmt.Sprintf("0x%x", uint32(tpmrc.TPMKeyNotFound)); got != want {
					t.Errorf("swtpm without migration key answered %q (%s), want %s", got, out, want)
				}

				wrong, _, err := EncodeMigration(plain, fileKey, otherKey(migKey), true)
				if err != nil {
					t.Fatal(err)
				}
				os.WriteFile(p, wrong, 0o600)
				sw4 := startSwtpm(t, shortTempDir(t), false, keyArgs...)
				sw4.ioctl("--stop")
				out, _ = sw4.ioctl("--load", "permanent", p)
				if got, want := swtpmResult(out), fmt.Sprintf("0x%x", uint32(tpmrc.TPMDecryptError)); got != want {
					t.Errorf("swtpm with a different migration key answered %q (%s), want %s", got, out, want)
				}
			}
		})
	}
}
