package instance

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/swtpm"
)

// TestServeReportsFailures checks that Serve reports what stops it on
// stderr as swtpm does, and exits 1.
func TestServeReportsFailures(t *testing.T) {
	dir := t.TempDir()
	base := []string{"--tpm2", "--isolation", "none", "--ctrl", "type=unixio,path=" + filepath.Join(dir, "ctrl")}
	tests := []struct {
		name       string
		args       []string
		wantStderr string
	}{
		{"the log does not open", []string{"--tpmstate", "dir=" + dir, "--log", "file=" + filepath.Join(dir, "no", "log")},
			"swtpm: --log: open "},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			opts, ext, err := swtpm.Parse(append(base, tc.args...), func(string) string { return "" })
			if err != nil {
				t.Fatal(err)
			}
			var stdout, stderr bytes.Buffer
			code := Serve(opts, ext, &stdout, &stderr, func(err error) string { return "described: " + err.Error() })
			if code != 1 || !strings.HasPrefix(stderr.String(), tc.wantStderr) {
				t.Errorf("exit %d, stderr %q; want 1 and %q", code, stderr.String(), tc.wantStderr)
			}
		})
	}
}
