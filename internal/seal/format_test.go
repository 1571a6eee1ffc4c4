package seal

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

var (
	testKey   = bytes.Repeat([]byte{0x42}, 32)
	otherKey  = bytes.Repeat([]byte{0x24}, 32)
	testUUID  = uuid.MustParse("11111111-2222-4333-8444-555555555555")
	otherUUID = uuid.MustParse("99999999-8888-4777-8666-555555555555")
)

func TestSealUnsealRoundTrip(t *testing.T) {
	tests := []struct {
		name  string
		blob  string
		gen   uint64
		plain []byte
	}{
		{"empty permall", "permall", 1, []byte{}},
		{"permall", "permall", 7, []byte("permanent state bytes")},
		{"volatile large gen", "volatilestate", 1<<64 - 1, bytes.Repeat([]byte{0xAB}, 5000)},
		{"savestate", "savestate", 2, []byte{0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file, err := Seal(testKey, testUUID, tt.blob, tt.gen, tt.plain)
			if err != nil {
				t.Fatalf("Seal: %v", err)
			}
			if got, want := len(file), len(tt.plain)+Overhead; got != want {
				t.Errorf("sealed size = %d, want %d", got, want)
			}
			if bytes.Contains(file, tt.plain) && len(tt.plain) > 4 {
				t.Errorf("sealed file contains the plaintext")
			}
			plain, gen, err := Unseal(testKey, testUUID, tt.blob, file)
			if err != nil {
				t.Fatalf("Unseal: %v", err)
			}
			if gen != tt.gen || !bytes.Equal(plain, tt.plain) {
				t.Errorf("Unseal = (%q, %d), want (%q, %d)", plain, gen, tt.plain, tt.gen)
			}
		})
	}
}

func TestSealRejects(t *testing.T) {
	tests := []struct {
		name string
		key  []byte
		blob string
		gen  uint64
	}{
		{"short key", testKey[:16], "permall", 1},
		{"unknown blob", testKey, "tpm2-00.permall", 1},
		{"generation zero", testKey, "permall", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Seal(tt.key, testUUID, tt.blob, tt.gen, []byte("x")); err == nil {
				t.Fatal("Seal succeeded, want error")
			}
		})
	}
}

func TestUnsealTamper(t *testing.T) {
	plain := []byte("the TPM's permanent state, long enough to have a body")
	good, err := Seal(testKey, testUUID, "permall", 3, plain)
	if err != nil {
		t.Fatal(err)
	}
	flip := func(i int) []byte {
		b := bytes.Clone(good)
		b[i] ^= 0x01
		return b
	}
	fromOther, _ := Seal(testKey, otherUUID, "permall", 3, plain)
	volatile, _ := Seal(testKey, testUUID, "volatilestate", 3, plain)
	tests := []struct {
		name    string
		key     []byte
		blob    string
		file    []byte
		want    error
		message string
	}{
		{"flipped magic", testKey, "permall", flip(0), ErrNotSealed, "bad magic"},
		{"flipped version", testKey, "permall", flip(9), ErrVersion, "format version 0"},
		{"flipped type", testKey, "permall", flip(10), ErrAuth, "authentication failed"},
		{"flipped reserved", testKey, "permall", flip(11), ErrAuth, "authentication failed"},
		{"flipped generation", testKey, "permall", flip(19), ErrAuth, "authentication failed"},
		{"flipped uuid", testKey, "permall", flip(25), ErrAuth, "its header names TPM"},
		{"flipped length up", testKey, "permall", flip(36), ErrTruncated, "the header announces"},
		{"flipped length down", testKey, "permall", flip(39), ErrAuth, "the header announces"},
		{"flipped nonce", testKey, "permall", flip(45), ErrAuth, "authentication failed"},
		{"flipped ciphertext", testKey, "permall", flip(headerLen + 5), ErrAuth, "authentication failed"},
		{"flipped tag", testKey, "permall", flip(len(good) - 1), ErrAuth, "authentication failed"},
		{"truncated body", testKey, "permall", good[:len(good)-1], ErrTruncated, "truncated"},
		{"truncated header", testKey, "permall", good[:30], ErrTruncated, "truncated"},
		{"truncated magic", testKey, "permall", good[:3], ErrTruncated, "truncated"},
		{"empty", testKey, "permall", nil, ErrTruncated, "truncated"},
		{"trailing data", testKey, "permall", append(bytes.Clone(good), 0), ErrAuth, "trailing data"},
		{"not sealed", testKey, "permall", []byte("TPM state in some other format"), ErrNotSealed, "bad magic"},
		{"wrong key", otherKey, "permall", good, ErrAuth, "wrong data key"},
		{"other TPM", testKey, "permall", fromOther, ErrWrongTPM, "holds state of TPM " + otherUUID.String() + ", this is TPM " + testUUID.String()},
		{"volatile as permall", testKey, "permall", volatile, ErrWrongType, "holds volatile state"},
		{"permall as volatile", testKey, "volatilestate", good, ErrWrongType, "holds permanent state"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := bytes.Clone(tt.file)
			plain, _, err := Unseal(tt.key, testUUID, tt.blob, tt.file)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Unseal error = %v, want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.message) {
				t.Errorf("error %q does not mention %q", err, tt.message)
			}
			if plain != nil {
				t.Errorf("Unseal returned plaintext with an error")
			}
			if !bytes.Equal(before, tt.file) {
				t.Errorf("Unseal modified its input")
			}
		})
	}
}

func FuzzUnseal(f *testing.F) {
	good, _ := Seal(testKey, testUUID, "permall", 1, []byte("seed state"))
	f.Add(good, []byte("seed state"), uint64(1), uint8(0))
	f.Add([]byte(Magic), []byte{}, uint64(5), uint8(1))
	f.Add(good[:headerLen], []byte{1, 2, 3}, uint64(1<<63), uint8(2))
	f.Fuzz(func(t *testing.T, file, plain []byte, gen uint64, which uint8) {
		name := Names[int(which)%len(Names)]
		if p, g, err := Unseal(testKey, testUUID, name, file); err == nil {
			// Only a file sealed under this key can verify; it must re-seal identically.
			again, err := Seal(testKey, testUUID, name, g, p)
			if err != nil {
				t.Fatalf("re-seal of a verified file: %v", err)
			}
			if p2, g2, err := Unseal(testKey, testUUID, name, again); err != nil || g2 != g || !bytes.Equal(p2, p) {
				t.Fatalf("re-sealed round trip failed: %v", err)
			}
		}
		if gen == 0 {
			gen = 1
		}
		sealed, err := Seal(testKey, testUUID, name, gen, plain)
		if err != nil {
			t.Fatalf("Seal: %v", err)
		}
		p, g, err := Unseal(testKey, testUUID, name, sealed)
		if err != nil || g != gen || !bytes.Equal(p, plain) {
			t.Fatalf("round trip: got (%q, %d, %v), want (%q, %d)", p, g, err, plain, gen)
		}
		if _, _, err := Unseal(testKey, otherUUID, name, sealed); !errors.Is(err, ErrWrongTPM) {
			t.Fatalf("unseal as another TPM: %v, want ErrWrongTPM", err)
		}
	})
}

// TestErrorKinds: every sentinel matches one errdefs kind, through any
// wrapping, and still only itself among the sentinels.
func TestErrorKinds(t *testing.T) {
	sentinels := []error{ErrTruncated, ErrNotSealed, ErrVersion, ErrAuth, ErrWrongTPM, ErrWrongType, ErrRollback, ErrUnknownBlob, ErrLocked}
	tests := []struct {
		err  error
		kind error
	}{
		{ErrTruncated, errdefs.ErrDataLoss},
		{ErrNotSealed, errdefs.ErrDataLoss},
		{ErrVersion, errdefs.ErrFailedPrecondition},
		{ErrAuth, errdefs.ErrDataLoss},
		{ErrWrongTPM, errdefs.ErrDataLoss},
		{ErrWrongType, errdefs.ErrDataLoss},
		{ErrRollback, errdefs.ErrDataLoss},
		{ErrUnknownBlob, errdefs.ErrInvalidArgument},
		{ErrLocked, errdefs.ErrFailedPrecondition},
	}
	for _, tt := range tests {
		t.Run(tt.err.Error(), func(t *testing.T) {
			wrapped := fmt.Errorf("load permall: %w", errf(tt.err, "a message with facts"))
			for _, err := range []error{tt.err, wrapped} {
				if k := errdefs.KindOf(err); k != tt.kind {
					t.Errorf("KindOf(%q) = %v, want %v", err, k, tt.kind)
				}
				for _, s := range sentinels {
					if got, want := errors.Is(err, s), s == tt.err; got != want {
						t.Errorf("errors.Is(%q, %q) = %v, want %v", err, s, got, want)
					}
				}
			}
		})
	}
}

// TestVersionRemedy: a newer format version names the way out as a remedy,
// not in the message.
func TestVersionRemedy(t *testing.T) {
	good, err := Seal(testKey, testUUID, "permall", 1, []byte("state"))
	if err != nil {
		t.Fatal(err)
	}
	good[9] = FormatVersion + 1
	_, _, err = Unseal(testKey, testUUID, "permall", good)
	if !errors.Is(err, ErrVersion) {
		t.Fatalf("Unseal = %v, want ErrVersion", err)
	}
	if want := fmt.Sprintf("sealed with format version %d, this vtpm reads version %d", FormatVersion+1, FormatVersion); err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	want := errdefs.Advise("use a vtpm release that knows the newer format")
	if rs := errdefs.Remedies(err); len(rs) != 1 || !rs[0].Equal(want) {
		t.Errorf("remedies %+v, want %+v", rs, want)
	}
}
