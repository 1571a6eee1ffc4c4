package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/testutil"
)

// TestForwardWithoutHelper: a host service command without vtpm-hostd
// beside vtpm or in PATH says where it looked and how to build it.
func TestForwardWithoutHelper(t *testing.T) {
	dir := t.TempDir()
	b, err := os.ReadFile(testutil.Binary(t))
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "vtpm")
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"host", "list"}, {"host", "serve", "--help"}} {
		cmd := exec.Command(exe, args...)
		cmd.Env = append(os.Environ(), "PATH="+t.TempDir())
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Fatalf("vtpm %s without vtpm-hostd succeeded:\n%s", strings.Join(args, " "), out)
		}
		for _, want := range []string{"vtpm-hostd", "neither beside vtpm (" + filepath.Join(dir, "vtpm-hostd") + ") nor in PATH", "`make build`"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("vtpm %s: output lacks %q:\n%s", strings.Join(args, " "), want, out)
			}
		}
	}
}

// TestForwardPassesArguments: vtpm hands `host …` to the vtpm-hostd beside
// it with its arguments unchanged (its own help answers).
func TestForwardPassesArguments(t *testing.T) {
	testutil.HostdBinary(t)
	out, err := exec.Command(testutil.Binary(t), "host", "trust", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.Contains(string(out), "vtpm-hostd host trust NAME ADDRESS CERTS.pem") {
		t.Errorf("vtpm host trust --help is not vtpm-hostd's:\n%s", out)
	}
}
