package keyfile

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

// testParams keep Argon2id cheap in tests.
var testParams = &Params{Time: 1, Memory: 64, Threads: 1}

func testKey() Key {
	dek := make([]byte, DEKSize)
	rand.Read(dek)
	return Key{TPM: uuid.New(), DEK: dek, Created: time.Date(2026, 3, 1, 12, 30, 45, 0, time.UTC)}
}

func encrypt(t testing.TB, k Key, pass string) []byte {
	t.Helper()
	f, err := Encrypt(k, pass, testParams)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name   string
		pass   string
		params *Params
	}{
		{"cheap", "correct horse battery staple", testParams},
		{"defaults", "pässwörd ✓", nil},
		{"threads", "x", &Params{Time: 2, Memory: 256, Threads: 4}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := testKey()
			f, err := Encrypt(k, tt.pass, tt.params)
			if err != nil {
				t.Fatal(err)
			}
			if len(f) != fileSize {
				t.Errorf("file is %d bytes, want %d", len(f), fileSize)
			}
			got, err := Decrypt(f, tt.pass)
			if err != nil {
				t.Fatalf("Decrypt: %v", err)
			}
			if got.TPM != k.TPM || !bytes.Equal(got.DEK, k.DEK) || !got.Created.Equal(k.Created) {
				t.Errorf("Decrypt = %+v, want %+v", got, k)
			}
			p := DefaultParams
			if tt.params != nil {
				p = *tt.params
			}
			if gotP := (Params{binary.BigEndian.Uint32(f[10:]), binary.BigEndian.Uint32(f[14:]), f[18]}); gotP != p {
				t.Errorf("header params %+v, want %+v", gotP, p)
			}
		})
	}
}

func TestEncryptDefaultsCreated(t *testing.T) {
	k := testKey()
	k.Created = time.Time{}
	before := time.Now().Truncate(time.Second)
	got, err := Decrypt(encrypt(t, k, "p"), "p")
	if err != nil {
		t.Fatal(err)
	}
	if got.Created.Before(before) || got.Created.After(time.Now()) {
		t.Errorf("Created = %v, want about now", got.Created)
	}
}

func TestEncryptErrors(t *testing.T) {
	k := testKey()
	short := k
	short.DEK = k.DEK[:16]
	tests := []struct {
		name   string
		k      Key
		pass   string
		params *Params
		want   string
	}{
		{"empty passphrase", k, "", testParams, "empty passphrase"},
		{"short DEK", short, "p", testParams, "16 bytes"},
		{"zero time", k, "p", &Params{Time: 0, Memory: 64, Threads: 1}, "time"},
		{"zero threads", k, "p", &Params{Time: 1, Memory: 64, Threads: 0}, "threads"},
		{"too little memory", k, "p", &Params{Time: 1, Memory: 16, Threads: 4}, "memory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Encrypt(tt.k, tt.pass, tt.params)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func TestDecryptErrors(t *testing.T) {
	good := encrypt(t, testKey(), "right")
	edit := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	flip := func(i int) []byte { return edit(func(b []byte) []byte { b[i] ^= 0x02; return b }) }
	tests := []struct {
		name string
		data []byte
		pass string
		want error
	}{
		{"wrong passphrase", good, "wrong", ErrWrongPassphrase},
		{"empty passphrase", good, "", ErrWrongPassphrase},
		{"flipped magic", flip(0), "right", ErrNotKeyFile},
		{"flipped time", flip(13), "right", ErrWrongPassphrase},
		{"flipped memory", flip(17), "right", ErrWrongPassphrase},
		{"flipped salt", flip(25), "right", ErrWrongPassphrase},
		{"flipped nonce", flip(40), "right", ErrWrongPassphrase},
		{"flipped ciphertext", flip(60), "right", ErrWrongPassphrase},
		{"flipped tag", flip(fileSize - 1), "right", ErrWrongPassphrase},
		{"future version", edit(func(b []byte) []byte { binary.BigEndian.PutUint16(b[8:], 2); return b }), "right", ErrUnsupportedVersion},
		{"version zero", edit(func(b []byte) []byte { binary.BigEndian.PutUint16(b[8:], 0); return b }), "right", ErrUnsupportedVersion},
		{"future version, short", edit(func(b []byte) []byte { binary.BigEndian.PutUint16(b[8:], 2); return b[:30] }), "right", ErrUnsupportedVersion},
		{"truncated to magic prefix", good[:4], "right", ErrTruncated},
		{"truncated in header", good[:20], "right", ErrTruncated},
		{"truncated in ciphertext", good[:fileSize-17], "right", ErrTruncated},
		{"truncated by one", good[:fileSize-1], "right", ErrTruncated},
		{"empty", nil, "right", ErrTruncated},
		{"other file", []byte("-----BEGIN CERTIFICATE-----\n"), "right", ErrNotKeyFile},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decrypt(tt.data, tt.pass)
			if !errors.Is(err, tt.want) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
		})
	}

	// Damage that is caught before Argon2id runs.
	for _, tt := range []struct {
		name string
		data []byte
		want string
	}{
		{"trailing byte", append(bytes.Clone(good), 0), "trailing data"},
		{"huge memory", edit(func(b []byte) []byte { binary.BigEndian.PutUint32(b[14:], 1<<31); return b }), "memory"},
		{"huge time", edit(func(b []byte) []byte { binary.BigEndian.PutUint32(b[10:], 1<<20); return b }), "time"},
		{"zero threads", edit(func(b []byte) []byte { b[18] = 0; return b }), "threads"},
		{"reserved byte", flip(19), "reserved"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decrypt(tt.data, "right")
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func TestErrorMessages(t *testing.T) {
	if got := ErrWrongPassphrase.Error(); !strings.Contains(got, "wrong passphrase, or the file was modified") {
		t.Errorf("ErrWrongPassphrase = %q", got)
	}
}

func FuzzDecrypt(f *testing.F) {
	// Bound Argon2id so each input runs in microseconds.
	savedMem, savedTime := maxMemoryKiB, maxTime
	maxMemoryKiB, maxTime = 1024, 2
	f.Cleanup(func() { maxMemoryKiB, maxTime = savedMem, savedTime })
	good := encrypt(f, testKey(), "pass")
	f.Add(good, "pass")
	f.Add(good[:50], "pass")
	f.Add([]byte(magic), "")
	f.Fuzz(func(t *testing.T, data []byte, pass string) {
		k, err := Decrypt(data, pass)
		if err != nil {
			return
		}
		if len(k.DEK) != DEKSize {
			t.Fatalf("Decrypt returned a %d-byte key", len(k.DEK))
		}
		// Whatever opens must re-encrypt and open to the same key.
		f2, err := Encrypt(k, pass+"x", &Params{Time: 1, Memory: 8, Threads: 1})
		if err != nil {
			t.Fatal(err)
		}
		k2, err := Decrypt(f2, pass+"x")
		if err != nil || k2.TPM != k.TPM || !bytes.Equal(k2.DEK, k.DEK) || !k2.Created.Equal(k.Created) {
			t.Fatalf("re-encrypted key differs: %v", err)
		}
	})
}
