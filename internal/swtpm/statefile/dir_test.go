package statefile

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"vtpm/internal/testutil"
	"vtpm/internal/tpmrc"
)

func openTestDir(t *testing.T, key *Key, mode os.FileMode) (*Dir, string) {
	t.Helper()
	dir := t.TempDir()
	d, err := OpenDir(dir, key, mode)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, dir
}

func fileMode(t *testing.T, p string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestDirStoreLoad(t *testing.T) {
	for _, key := range []*Key{nil, key128, key256} {
		d, dir := openTestDir(t, key, 0o600)
		plain := testPlain(500)
		if err := d.Store("permall", plain); err != nil {
			t.Fatalf("Store: %v", err)
		}
		p := filepath.Join(dir, "tpm2-00.permall")
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if dec, err := DecodeFile(raw, key); err != nil || !bytes.Equal(dec, plain) {
			t.Fatalf("stored file does not decode to the data: %v", err)
		}
		if m := fileMode(t, p); m != 0o600 {
			t.Errorf("new file mode %o, want 600", m)
		}
		if _, err := os.Stat(filepath.Join(dir, "TMP2-00.permall")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("temporary file left behind: %v", err)
		}
		got, err := d.Load("permall")
		if err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("Load: %v", err)
		}
	}
}

func TestDirDefaultModeAndChmodOnLoad(t *testing.T) {
	d, dir := openTestDir(t, nil, 0)
	if err := d.Store("volatilestate", []byte("v")); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "tpm2-00.volatilestate")
	if m := fileMode(t, p); m != DefaultMode {
		t.Fatalf("mode %o, want default %o", m, DefaultMode)
	}
	if err := os.Chmod(p, 0o604); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Load("volatilestate"); err != nil {
		t.Fatal(err)
	}
	if m := fileMode(t, p); m != DefaultMode {
		t.Fatalf("after Load mode %o, want it reset to %o", m, DefaultMode)
	}
}

func TestDirLoadMissing(t *testing.T) {
	d, _ := openTestDir(t, key128, 0o600)
	_, err := d.Load("savestate")
	if !errors.Is(err, fs.ErrNotExist) || tpmrc.Of(err) != tpmrc.TPMRetry {
		t.Fatalf("Load of a missing state: %v; want fs.ErrNotExist and TPM_RETRY", err)
	}
}

func TestDirUnknownName(t *testing.T) {
	d, _ := openTestDir(t, nil, 0)
	if _, err := d.Load("../etc"); tpmrc.Of(err) != tpmrc.TPMBadType {
		t.Errorf("Load: %v", err)
	}
	if err := d.Store("other", nil); tpmrc.Of(err) != tpmrc.TPMBadType {
		t.Errorf("Store: %v", err)
	}
	if err := d.Delete("other", false); tpmrc.Of(err) != tpmrc.TPMBadType {
		t.Errorf("Delete: %v", err)
	}
}

func TestDirStoreDoesNotFollowSymlink(t *testing.T) {
	d, dir := openTestDir(t, nil, 0)
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(dir, "TMP2-00.permall")); err != nil {
		t.Fatal(err)
	}
	if err := d.Store("permall", []byte("data")); err == nil {
		t.Fatal("Store wrote through a symlinked temporary file")
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep" {
		t.Fatalf("symlink target changed to %q", b)
	}
}

func TestDirDeleteAndStates(t *testing.T) {
	d, dir := openTestDir(t, key256, 0o600)
	if HasState(dir) {
		t.Fatal("HasState on an empty directory")
	}
	if st, err := d.States(); err != nil || len(st) != 0 {
		t.Fatalf("States of empty dir = %v, %v", st, err)
	}
	for _, name := range []string{"volatilestate", "permall"} {
		if err := d.Store(name, testPlain(100)); err != nil {
			t.Fatal(err)
		}
	}
	if !HasState(dir) {
		t.Fatal("HasState false after storing permall")
	}
	st, err := d.States()
	if err != nil {
		t.Fatal(err)
	}
	// 100 bytes pad to 128 under AES-256: header + TLVs of 128, 32, 32.
	want := []StateInfo{{"permall", 10 + 6*3 + 128 + 32 + 32}, {"volatilestate", 10 + 6*3 + 128 + 32 + 32}}
	if !slices.Equal(st, want) {
		t.Fatalf("States = %v, want %v", st, want)
	}

	if err := d.Delete("savestate", false); err != nil {
		t.Errorf("Delete of missing state without mustExist: %v", err)
	}
	if err := d.Delete("savestate", true); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Delete of missing state with mustExist: %v", err)
	}
	if err := d.Delete("permall", true); err != nil {
		t.Fatal(err)
	}
	if HasState(dir) {
		t.Fatal("HasState after deleting permall")
	}
}

func TestOpenDirErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "f")
	os.WriteFile(file, nil, 0o600)
	tests := []struct {
		name string
		dir  string
		key  *Key
	}{
		{"missing", filepath.Join(t.TempDir(), "nope"), nil},
		{"not a directory", file, nil},
		{"bad key size", t.TempDir(), &Key{Bytes: make([]byte, 8)}},
	}
	for _, tt := range tests {
		if _, err := OpenDir(tt.dir, tt.key, 0); err == nil {
			t.Errorf("%s: OpenDir succeeded", tt.name)
		}
	}
}

// lockFDs counts this process's descriptors open on p.
func lockFDs(t *testing.T, p string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		testutil.Missing(t, "cannot list /proc/self/fd: %v", err)
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && target == p {
			n++
		}
	}
	return n
}

// The lock must exclude swtpm itself: a POSIX lock cannot be observed from
// inside the process that holds it, so the real swtpm is the other process.
func TestDirLockExcludesSwtpm(t *testing.T) {
	requireSwtpm(t)
	d, dir := openTestDir(t, nil, 0)
	if err := d.Store("permall", testPlain(77)); err != nil {
		t.Fatal(err)
	}
	printStates := func() (string, error) {
		out, err := exec.Command("swtpm", "socket", "--tpm2", "--print-states", "--tpmstate", "dir="+dir).Output()
		return string(out), err
	}

	for range 2 { // a second Init is a no-op, not a second descriptor
		if err := d.Init(); err != nil {
			t.Fatalf("Init: %v", err)
		}
	}
	if n := lockFDs(t, filepath.Join(dir, ".lock")); n != 1 {
		t.Fatalf("%d descriptors open on .lock, want exactly 1", n)
	}
	if out, err := printStates(); err == nil {
		t.Fatalf("swtpm got the state lock while we hold it: %s", out)
	}

	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := printStates()
	if err != nil {
		t.Fatalf("swtpm --print-states after Close: %v", err)
	}
	var ps struct {
		States []struct {
			Name string `json:"name"`
			Size int64  `json:"size"`
		} `json:"states"`
	}
	if err := json.Unmarshal([]byte(out), &ps); err != nil {
		t.Fatalf("parsing %q: %v", out, err)
	}
	ours, err := d.States()
	if err != nil {
		t.Fatal(err)
	}
	if len(ps.States) != len(ours) || ps.States[0].Name != ours[0].Name || ps.States[0].Size != ours[0].Size {
		t.Fatalf("swtpm reports %+v, we report %+v", ps.States, ours)
	}
}

func TestDirInitFailsWhileSwtpmRuns(t *testing.T) {
	requireSwtpm(t)
	dir := shortTempDir(t)
	sw := startSwtpm(t, dir, true)
	d, err := OpenDir(dir, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Init(); tpmrc.Of(err) != tpmrc.TPMFail {
		t.Fatalf("Init while swtpm holds the lock: %v, want TPM_FAIL", err)
	}
	sw.shutdown(t)
	if err := d.Init(); err != nil {
		t.Fatalf("Init after swtpm exited: %v", err)
	}
}
