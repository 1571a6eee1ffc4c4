package hostkey

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

var key32 = bytes.Repeat([]byte{0xA5, 0x01, 0x7E, 0xFF}, 8)

func TestDataKey(t *testing.T) {
	t.Parallel()
	hexKey := hex.EncodeToString(key32)
	tests := []struct {
		name    string
		content []byte
		opts    string // appended to file=PATH
		wantErr string
	}{
		{name: "hex", content: []byte(hexKey)},
		{name: "hex with 0x and newline", content: []byte("0x" + hexKey + "\n")},
		{name: "explicit hex", content: []byte(hexKey), opts: ",format=hex"},
		{name: "binary", content: key32, opts: ",format=binary"},
		{name: "short hex", content: []byte(hexKey[:62]), wantErr: "want 64 hex digits"},
		{name: "not hex", content: []byte(strings.Repeat("zz", 32)), wantErr: "want 64 hex digits"},
		{name: "short binary", content: key32[:31], opts: ",format=binary", wantErr: "binary key has 31 bytes"},
		{name: "unknown format", content: key32, opts: ",format=base64", wantErr: `format="base64"`},
		{name: "unknown option", content: key32, opts: ",mode=aes-256-cbc", wantErr: "--data-key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := filepath.Join(t.TempDir(), "dek")
			if err := os.WriteFile(p, tc.content, 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := DataKey("file=" + p + tc.opts)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("DataKey: %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !bytes.Equal(got, key32) {
				t.Fatalf("DataKey = %x, %v; want %x", got, err, key32)
			}
		})
	}
}

func TestDataKeyMissingSource(t *testing.T) {
	t.Parallel()
	for _, opt := range []string{"format=hex", "file=" + filepath.Join(t.TempDir(), "absent")} {
		if _, err := DataKey(opt); err == nil || !strings.Contains(err.Error(), "--data-key") {
			t.Errorf("DataKey(%q) = %v, want a --data-key error", opt, err)
		}
	}
}

func TestDataKeyFD(t *testing.T) {
	t.Parallel()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	w.WriteString(hex.EncodeToString(key32) + "\n")
	w.Close()
	// DataKey takes the descriptor over and closes it, so give it its own.
	fd, err := syscall.Dup(int(r.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	got, err := DataKey("fd=" + strconv.Itoa(fd))
	if err != nil || !bytes.Equal(got, key32) {
		t.Fatalf("DataKey(fd) = %x, %v; want %x", got, err, key32)
	}
}

func TestHostKeyCreatedOnceAndKept(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "root", "host.key")
	k1, err := Load(path)
	if err != nil || len(k1) != 32 {
		t.Fatalf("first Load = %x, %v; want a new 32-byte key", k1, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("host key mode %o, want 600", fi.Mode().Perm())
	}
	k2, err := Load(path)
	if err != nil || !bytes.Equal(k1, k2) {
		t.Fatalf("second Load = %x, %v; want the first key %x", k2, err, k1)
	}
	if err := os.WriteFile(path, []byte("garbage\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), "is damaged") {
		t.Fatalf("Load of a damaged key: %v, want 'is damaged'", err)
	}
}

func TestDataKeyDefaultsToHostKey(t *testing.T) {
	root := t.TempDir()
	t.Setenv("VTPM_HOME", root)
	if got, want := Path(), filepath.Join(root, "host.key"); got != want {
		t.Fatalf("Path() = %s, want %s", got, want)
	}
	k, err := DataKey("")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(root, "host.key"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(raw)) != hex.EncodeToString(k) {
		t.Fatalf("DataKey(\"\") = %x, host.key holds %q", k, raw)
	}
}
