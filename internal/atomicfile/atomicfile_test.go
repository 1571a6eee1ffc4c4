package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f.json")
	for _, tc := range []struct {
		data string
		mode os.FileMode
	}{{"first", 0o600}, {"second, longer content", 0o644}} {
		if err := Write(p, []byte(tc.data), tc.mode); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil || string(b) != tc.data {
			t.Fatalf("read back %q, %v; want %q", b, err, tc.data)
		}
		st, _ := os.Stat(p)
		if st.Mode().Perm() != tc.mode {
			t.Errorf("mode %v, want %v", st.Mode().Perm(), tc.mode)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the file (no temporary left)", len(entries))
	}
}

func TestFailedRenameLeavesNoTemporary(t *testing.T) {
	dir := t.TempDir()
	// A non-empty directory in the way makes the rename fail.
	p := filepath.Join(dir, "f")
	if err := os.MkdirAll(filepath.Join(p, "child"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := Write(p, []byte("x"), 0o600); err == nil {
		t.Fatal("write over a non-empty directory succeeded")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || entries[0].Name() != "f" {
		t.Errorf("directory holds %v after a failed write, want only f", entries)
	}
	if _, err := os.Stat(filepath.Join(p, "child")); err != nil {
		t.Errorf("the directory in the way was changed: %v", err)
	}
}
