package instance_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/testutil"
)

// TestRunAsKeepsRollbackProtection starts vtpm as root with --runas nobody
// on a new and then on an existing state directory: the serving process
// runs as nobody, tpm2-tools work, and the generations it records (through
// the record pinned before dropping privileges) make a restored old copy
// of the state directory a refused rollback.
func TestRunAsKeepsRollbackProtection(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "--runas needs root")
	}
	needTools(t)
	testutil.Need(t, "tpm2_nvdefine", "tpm2_nvwrite")
	base := shortDir(t)
	// The unprivileged process opens its state directory by path.
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	home, state, old := filepath.Join(base, "home"), filepath.Join(base, "state"), filepath.Join(base, "old")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := tpmConfig{transport: tcpBoth, stateDir: state, home: home, args: []string{"--runas", "nobody"}}
	first, second := []byte("written by nobody, first"), []byte("written by nobody, later")

	steps := []struct {
		name string
		run  func(t *testing.T, p *tpmProc)
	}{
		{"new state", func(t *testing.T, p *tpmProc) {
			p.writeMarks(t, first, [32]byte{1})
			if got := p.readNV(t, len(first)); !bytes.Equal(got, first) {
				t.Errorf("NV reads %q, want %q", got, first)
			}
		}},
		{"existing state", func(t *testing.T, p *tpmProc) {
			p.tpm2(t, "tpm2_startup", "-c")
			if got := p.readNV(t, len(first)); !bytes.Equal(got, first) {
				t.Errorf("NV reads %q after restart, want %q", got, first)
			}
			// The copy a rollback would put back.
			copyTree(t, state, old)
			f := filepath.Join(p.dir, "nv.more")
			mustWriteFile(t, f, second)
			p.tpm2(t, "tpm2_nvwrite", testNVIndex, "-C", "o", "-i", f)
			if got := p.readNV(t, len(second)); !bytes.Equal(got, second) {
				t.Errorf("NV reads %q, want %q", got, second)
			}
		}},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			p := startTPM(t, ourVtpm, cfg)
			p.mustIoctl(t, "-i")
			st := procStatus(t, p.Cmd.Process.Pid)
			for i, id := range strings.Fields(st["Uid"]) {
				if id != "65534" {
					t.Errorf("/proc/PID/status Uid: %q: field %d is %s, want nobody (65534)", st["Uid"], i, id)
				}
			}
			s.run(t, p)
			p.shutdown(t)
			for _, bad := range []string{"not recorded", "record generation", "ERROR"} {
				if strings.Contains(p.Stderr.String(), bad) {
					t.Errorf("instance output contains %q:\n%s", bad, p.Stderr)
				}
			}
		})
	}
	if t.Failed() {
		return
	}
	// Put the old copy back: refused, so the records were written by the
	// unprivileged process.
	if err := os.RemoveAll(state); err != nil {
		t.Fatal(err)
	}
	copyTree(t, old, state)
	p := startVTPM(t, home, state, "--runas", "nobody")
	code, out := p.wait(t)
	if code <= 0 {
		t.Fatalf("vtpm --runas on a rolled back state exited with %d, want a failure; output:\n%s", code, out)
	}
	for _, w := range []string{"rollback", "was seen last", "--allow-rollback"} {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
	// Accepting it deliberately still works as nobody.
	p = startVTPM(t, home, state, "--runas", "nobody", "--allow-rollback")
	if _, err := p.dial(t); err != nil {
		p.cmd.Process.Kill()
		_, out := p.wait(t)
		t.Fatalf("vtpm --runas --allow-rollback: %v\n%s", err, out)
	}
}

// TestRunAsUnreachableState: a state directory the --runas user cannot
// reach (a parent is 0700 root) fails at start with the cause and the fix.
func TestRunAsUnreachableState(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "--runas needs root")
	}
	private := t.TempDir() // 0700, root's
	if err := os.Chmod(private, 0o700); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(private, "state")
	p := startVTPM(t, filepath.Join(private, "home"), state, "--runas", "nobody")
	code, out := p.wait(t)
	if code <= 0 {
		t.Fatalf("vtpm exited with %d, want a failure; output:\n%s", code, out)
	}
	for _, w := range []string{"--runas nobody", "cannot reach the state directory " + state, "chmod o+x"} {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}

// TestRunAsRefusesRoot: --runas root (by name or uid) drops nothing, and an
// unknown user cannot be dropped to; each is refused before the state
// directory is touched, never run as uid 0.
func TestRunAsRefusesRoot(t *testing.T) {
	for _, tc := range []struct{ user, want string }{
		{"root", "--runas root: that is root (uid 0)"},
		{"0", "--runas 0: that is root (uid 0)"},
		{"no-such-user-vtpm", "--runas no-such-user-vtpm: no such user"},
	} {
		t.Run(tc.user, func(t *testing.T) {
			base := t.TempDir()
			home, state := filepath.Join(base, "home"), filepath.Join(base, "state")
			p := startVTPM(t, home, state, "--runas", tc.user)
			code, out := p.wait(t)
			if code <= 0 {
				t.Fatalf("vtpm --runas %s exited with %d, want a failure; output:\n%s", tc.user, code, out)
			}
			if !strings.Contains(out, tc.want) {
				t.Errorf("output lacks %q:\n%s", tc.want, out)
			}
			for _, p := range []string{home, state} {
				if _, err := os.Stat(p); err == nil {
					t.Errorf("the refused start created %s", p)
				}
			}
		})
	}
}
