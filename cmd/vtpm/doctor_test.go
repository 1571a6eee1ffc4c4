package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/sandbox"
	"vtpm/internal/testutil"
)

// TestDoctor runs `vtpm doctor --json` against data roots in different
// states and checks each report line and the exit status.
func TestDoctor(t *testing.T) {
	t.Parallel()
	sandboxOK := sandbox.SeccompAvailable() == nil
	if _, err := sandbox.LandlockABI(); err != nil {
		sandboxOK = false
	}
	tests := []struct {
		name       string
		setup      func(t *testing.T, root string)
		wantStatus string // of the data root check
		wantFix    string // part of its fix, if any
	}{
		{"no data root yet", func(t *testing.T, root string) {}, statusWarning, ""},
		{"private data root", func(t *testing.T, root string) { mkdir(t, root, 0o700) }, statusOK, ""},
		{"data root others can read", func(t *testing.T, root string) { mkdir(t, root, 0o755) }, statusMissing, "chmod 700 "},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			root := filepath.Join(t.TempDir(), "vtpm")
			tc.setup(t, root)
			out, err := testutil.RunErr([]string{"VTPM_HOME=" + root}, testutil.Binary(t), "doctor", "--json")
			// RunErr mixes stderr in: the JSON array is what stdout holds.
			js := out[:strings.LastIndex(out, "]")+1]
			var checks []check
			if err := json.Unmarshal([]byte(js), &checks); err != nil {
				t.Fatalf("doctor --json: %v\n%s", err, out)
			}
			byName := map[string]check{}
			missing := false
			for _, c := range checks {
				byName[c.Name] = c
				switch c.Status {
				case statusOK:
				case statusWarning, statusMissing:
					missing = missing || c.Status == statusMissing
					if c.Fix == "" && c.Name != "data root" {
						t.Errorf("%s is %s without a fix: %+v", c.Name, c.Status, c)
					}
				default:
					t.Errorf("%s: status %q, want ok, warning or missing", c.Name, c.Status)
				}
			}
			if (err != nil) != missing {
				t.Errorf("exit error %v with a missing check: %v\n%s", err, missing, out)
			}
			for _, name := range []string{"seccomp", "landlock", "no_new_privs", "user", "namespaces", "locked memory", "kvm", "qemu", "ovmf", "keystore", "rollback records", "data root", "host service"} {
				if _, ok := byName[name]; !ok {
					t.Errorf("no %q check in %s", name, js)
				}
			}
			if sandboxOK {
				for _, name := range []string{"seccomp", "landlock", "no_new_privs"} {
					if c := byName[name]; c.Status != statusOK {
						t.Errorf("%s: %+v, want ok on this kernel", name, c)
					}
				}
			}
			dr := byName["data root"]
			if dr.Status != tc.wantStatus || !strings.Contains(dr.Fix, tc.wantFix) || !strings.Contains(dr.Detail, root) {
				t.Errorf("data root: %+v, want %s naming %s with fix %q", dr, tc.wantStatus, root, tc.wantFix)
			}
			if _, err := os.Stat(filepath.Join(root, "keystore")); err == nil {
				t.Error("doctor created a keystore")
			}
		})
	}
}

func mkdir(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	if err := os.Mkdir(dir, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
}

func TestPrintChecks(t *testing.T) {
	tests := []struct {
		name    string
		checks  []check
		wantErr string
		want    []string
	}{
		{"all ok", []check{{Name: "kvm", Status: statusOK, Detail: "usable"}}, "", []string{"ok       kvm                  usable\n"}},
		{"a warning is not a failure", []check{{Name: "user", Status: statusWarning, Detail: "root", Fix: "--runas tss"}}, "",
			[]string{"warning  user", "fix: --runas tss"}},
		{"missing fails", []check{{Name: "kvm", Status: statusOK}, {Name: "ovmf", Status: statusMissing, Detail: "absent", Fix: "apt install ovmf"}},
			"1 of 2 checks missing", []string{"missing  ovmf", "fix: apt install ovmf"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			err := printChecks(&b, tc.checks, false)
			if (err == nil) != (tc.wantErr == "") || err != nil && err.Error() != tc.wantErr {
				t.Errorf("error %v, want %q", err, tc.wantErr)
			}
			for _, w := range tc.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, b.String())
				}
			}
		})
	}
}
