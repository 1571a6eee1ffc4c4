package secretfile

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
)

func TestRead(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "pw")
	if err := os.WriteFile(file, []byte("first line\nsecond line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SECRETFILE_TEST", "from env")
	tests := []struct {
		name, file, env string
		want            string
		wantErr         error
		wantMsg         string
	}{
		{name: "file: its first line", file: file, env: "SECRETFILE_TEST", want: "first line"},
		{name: "environment", env: "SECRETFILE_TEST", want: "from env"},
		{name: "neither", env: "SECRETFILE_UNSET", wantErr: errdefs.ErrInvalidArgument,
			wantMsg: "no passphrase: give --passphrase-file FILE or set SECRETFILE_UNSET"},
		{name: "missing file", file: filepath.Join(dir, "nosuch"), env: "SECRETFILE_TEST", wantErr: os.ErrNotExist,
			wantMsg: "read passphrase file: "},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Read(tc.file, tc.env, "passphrase")
			if !errors.Is(err, tc.wantErr) || err != nil && !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("error %v, want %v containing %q", err, tc.wantErr, tc.wantMsg)
			}
			if got != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestCreate(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing")
	if err := os.WriteFile(existing, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path string
		wantFile   string // the file that must then hold the data; "" for stdout
		wantErr    error
	}{
		{name: "new file", path: filepath.Join(dir, "new"), wantFile: filepath.Join(dir, "new")},
		{name: "stdout", path: ""},
		{name: "dash is stdout", path: "-"},
		{name: "never overwrites", path: existing, wantErr: errdefs.ErrAlreadyExists},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var stdout bytes.Buffer
			err := Create(tc.path, []byte("data"), 0o600, &stdout)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			switch {
			case err != nil:
				if b, _ := os.ReadFile(tc.path); string(b) != "keep" {
					t.Errorf("%s now holds %q", tc.path, b)
				}
			case tc.wantFile == "":
				if stdout.String() != "data" {
					t.Errorf("stdout %q, want data", stdout.String())
				}
			default:
				st, err := os.Stat(tc.wantFile)
				if err != nil {
					t.Fatal(err)
				}
				if st.Mode().Perm() != 0o600 {
					t.Errorf("%s: mode %v, want 0600", tc.wantFile, st.Mode())
				}
				if b, _ := os.ReadFile(tc.wantFile); string(b) != "data" {
					t.Errorf("%s holds %q", tc.wantFile, b)
				}
			}
		})
	}
}
