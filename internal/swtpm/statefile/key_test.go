package statefile

import (
	"bytes"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

const (
	hex128 = "00112233445566778899aabbccddeeff"
	hex256 = hex128 + "0123456789ABCDEF0123456789abcdef"
)

func TestParseKeyOption(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hexFile := write("hex128", "0x"+hex128+"\n")
	hex256File := write("hex256", hex256)
	hexTrailing := write("hextrailing", hex128+" junk after whitespace")
	hexShort := write("hexshort", hex128[:30]+"\n")
	hexLong := write("hexlong", hex128+"00\n")
	hexBad := write("hexbad", hex128[:10]+"zz"+hex128[12:])
	hexUpperPrefix := write("hexupper", "0X"+hex128)
	bin32 := write("bin32", strings.Repeat("\x01", 32))
	bin16 := write("bin16", strings.Repeat("\x02", 16))
	pwd := write("pwd", "correct horse battery staple\n")
	pwdSHA := write("pwdsha", "another passphrase")
	empty := write("empty", "")
	missing := filepath.Join(dir, "missing")

	tests := []struct {
		name    string
		opt     string
		want    string // hex of the key
		wantErr string
	}{
		{name: "hex file with 0x and newline", opt: "file=" + hexFile, want: hex128},
		{name: "aes-cbc is aes-128", opt: "file=" + hexFile + ",mode=aes-cbc", want: hex128},
		{name: "hex 256 at EOF", opt: "file=" + hex256File + ",mode=aes-256-cbc", want: strings.ToLower(hex256)},
		{name: "hex followed by whitespace then anything", opt: "file=" + hexTrailing + ",format=hex", want: hex128},
		{name: "binary 256", opt: "file=" + bin32 + ",format=binary,mode=aes-256-cbc", want: strings.Repeat("01", 32)},
		{name: "binary 128", opt: "file=" + bin16 + ",format=binary", want: strings.Repeat("02", 16)},
		{name: "pbkdf2 keeps the newline", opt: "pwdfile=" + pwd + ",mode=aes-256-cbc",
			want: "a1d3850e5a1805f07bc139ea1ef5b740ba5d20229e06e7318691d73e56ae1dee"},
		{name: "pbkdf2 explicit", opt: "pwdfile=" + pwd + ",mode=aes-256-cbc,kdf=pbkdf2",
			want: "a1d3850e5a1805f07bc139ea1ef5b740ba5d20229e06e7318691d73e56ae1dee"},
		{name: "sha512 kdf", opt: "pwdfile=" + pwdSHA + ",kdf=sha512", want: "81a0beb9fb911a022fec3768443d7de6"},
		{name: "remove=false keeps file", opt: "file=" + hexFile + ",remove=false", want: hex128},

		{name: "unknown sub-option", opt: "file=" + hexFile + ",colour=red", wantErr: `unknown sub-option "colour"`},
		{name: "no source", opt: "mode=aes-256-cbc", wantErr: "missing key source"},
		{name: "two sources", opt: "file=" + hexFile + ",pwdfile=" + pwd, wantErr: "mutually exclusive"},
		{name: "bad mode", opt: "file=" + hexFile + ",mode=aes-512-cbc", wantErr: `mode="aes-512-cbc": unsupported`},
		{name: "bad format", opt: "file=" + hexFile + ",format=base64", wantErr: `format="base64": unsupported`},
		{name: "bad kdf", opt: "pwdfile=" + pwd + ",kdf=scrypt", wantErr: `kdf="scrypt": unsupported`},
		{name: "bad remove", opt: "file=" + hexFile + ",remove=maybe", wantErr: `remove="maybe"`},
		{name: "empty path", opt: "file=", wantErr: "file= needs a path"},
		{name: "missing file", opt: "file=" + missing, wantErr: "opening key source"},
		{name: "missing pwdfile", opt: "pwdfile=" + missing, wantErr: "pwdfile=" + missing + ": opening key source"},
		{name: "fd not a number", opt: "fd=three", wantErr: `fd="three": want a non-negative`},
		{name: "negative pwdfd", opt: "pwdfd=-1", wantErr: `pwdfd="-1": want a non-negative`},
		{name: "closed fd", opt: "fd=987654", wantErr: "fd=987654: reading key source"},
		{name: "hex too short", opt: "file=" + hexShort, wantErr: "hex key has 30 digits, mode=aes-128-cbc needs 32"},
		{name: "hex too long", opt: "file=" + hexLong, wantErr: "hex key has 34 digits"},
		{name: "hex 256 digits with 128 mode", opt: "file=" + hex256File, wantErr: "hex key has 64 digits, mode=aes-128-cbc needs 32"},
		{name: "hex 128 digits with 256 mode", opt: "file=" + hexFile + ",mode=aes-256-cbc", wantErr: "needs 64"},
		{name: "hex invalid character", opt: "file=" + hexBad, wantErr: `invalid character 'z'`},
		{name: "hex uppercase prefix", opt: "file=" + hexUpperPrefix, wantErr: `invalid character 'X'`},
		{name: "empty hex file", opt: "file=" + empty, wantErr: "hex key has 0 digits"},
		{name: "binary too short", opt: "file=" + bin16 + ",format=binary,mode=aes-256-cbc", wantErr: "binary key must be exactly 32 bytes"},
		{name: "binary too long", opt: "file=" + bin32 + ",format=binary", wantErr: "binary key must be exactly 16 bytes"},
		{name: "empty passphrase", opt: "pwdfile=" + empty, wantErr: "passphrase is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := ParseKeyOption(tt.opt)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseKeyOption(%q) error = %v, want it to contain %q", tt.opt, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseKeyOption(%q): %v", tt.opt, err)
			}
			if got := hex.EncodeToString(k.Bytes); got != tt.want {
				t.Fatalf("ParseKeyOption(%q) = %s, want %s", tt.opt, got, tt.want)
			}
		})
	}
}

func TestParseKeyOptionRemove(t *testing.T) {
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, []byte(hex128), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ParseKeyOption("file=" + p + ",remove"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Fatalf("key file still exists after remove: %v", err)
	}
}

// The fd forms read from inherited descriptors, as libvirt passes them:
// pipes written and closed by the parent.
func TestParseKeyOptionFD(t *testing.T) {
	pipe := func(content []byte) *os.File {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		w.Write(content)
		w.Close()
		return r
	}
	binKey := bytes.Repeat([]byte{7}, 32)
	files := []*os.File{
		pipe([]byte(hex128 + "\n")),                    // fd=3
		pipe([]byte("correct horse battery staple\n")), // fd=4
		pipe(binKey), // fd=5
	}
	k, err := ParseKeyOption("fd=3", files...)
	if err != nil || hex.EncodeToString(k.Bytes) != hex128 {
		t.Fatalf("fd=3: %x, %v", k, err)
	}
	k, err = ParseKeyOption("pwdfd=4,mode=aes-256-cbc", files...)
	if err != nil || hex.EncodeToString(k.Bytes) != "a1d3850e5a1805f07bc139ea1ef5b740ba5d20229e06e7318691d73e56ae1dee" {
		t.Fatalf("pwdfd=4: %x, %v", k, err)
	}
	k, err = ParseKeyOption("fd=5,format=binary,mode=aes-256-cbc", files...)
	if err != nil || !bytes.Equal(k.Bytes, binKey) {
		t.Fatalf("fd=5: %x, %v", k, err)
	}

	// A descriptor number outside extraFiles is this process's own.
	// It is closed after reading, so hand over a duplicate.
	n, err := syscall.Dup(int(pipe([]byte(hex128)).Fd()))
	if err != nil {
		t.Fatal(err)
	}
	k, err = ParseKeyOption("fd=" + strconv.Itoa(n))
	if err != nil || hex.EncodeToString(k.Bytes) != hex128 {
		t.Fatalf("own fd: %x, %v", k, err)
	}
}
