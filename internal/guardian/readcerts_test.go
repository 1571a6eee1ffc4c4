package guardian

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadCertificatesNamesTheFile(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not PEM"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path string
		wantIs     error  // nil: any error
		wantPrefix string // of the message
	}{
		{"missing file", filepath.Join(dir, "nosuch.pem"), fs.ErrNotExist, "open " + filepath.Join(dir, "nosuch.pem")},
		{"not certificates", garbage, nil, garbage + ": "},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g, err := ReadCertificates(tc.path)
			if err == nil || g != nil {
				t.Fatalf("ReadCertificates(%s) = %v, %v; want an error", tc.path, g, err)
			}
			if tc.wantIs != nil && !errors.Is(err, tc.wantIs) {
				t.Errorf("error %v, want %v", err, tc.wantIs)
			}
			if !strings.HasPrefix(err.Error(), tc.wantPrefix) {
				t.Errorf("error %q, want it to start with %q", err, tc.wantPrefix)
			}
		})
	}
}
