package keybroker

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

func TestParseDataKey(t *testing.T) {
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
			got, err := ParseDataKey("file=" + p + tc.opts)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("DataKey: %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !bytes.Equal(got.bytes(), key32) {
				t.Fatalf("DataKey = %x, %v; want %x", got.bytes(), err, key32)
			}
		})
	}
}

func TestParseDataKeyMissingSource(t *testing.T) {
	t.Parallel()
	for _, opt := range []string{"format=hex", "file=" + filepath.Join(t.TempDir(), "absent")} {
		if _, err := ParseDataKey(opt); err == nil || !strings.Contains(err.Error(), "--data-key") {
			t.Errorf("ParseDataKey(%q) = %v, want a --data-key error", opt, err)
		}
	}
}

func TestParseDataKeyFD(t *testing.T) {
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
	got, err := ParseDataKey("fd=" + strconv.Itoa(fd))
	if err != nil || !bytes.Equal(got.bytes(), key32) {
		t.Fatalf("ParseDataKey(fd) = %x, %v; want %x", got.bytes(), err, key32)
	}
}
