package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/state"
)

// TestSwtpmSetupStateFormat: swtpm_setup makes the state in the format
// VTPM_STATE_FORMAT asks for, and refuses to make it in a directory that
// holds the other format.
func TestSwtpmSetupStateFormat(t *testing.T) {
	tests := []struct {
		name   string
		format string
		files  []string // made, besides the .lock
		absent []string
	}{
		{"default", "", []string{state.IdentityFile}, []string{"tpm2-00.permall"}},
		{"sealed", "sealed", []string{state.IdentityFile}, []string{"tpm2-00.permall"}},
		{"swtpm", "swtpm", []string{"tpm2-00.permall"}, []string{state.IdentityFile, "protector.json"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := setupEnv(t)
			t.Setenv(state.FormatEnv, tc.format)
			log := filepath.Join(t.TempDir(), "setup.log")
			if code, _, stderr := setup(t, libvirtArgs(dir, log)...); code != 0 {
				b, _ := os.ReadFile(log)
				t.Fatalf("swtpm_setup exit %d: %s\n%s", code, stderr, b)
			}
			for _, f := range tc.files {
				if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
					t.Errorf("%s: %v", f, err)
				}
			}
			for _, f := range tc.absent {
				if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
					t.Errorf("%s exists in %s state", f, tc.format)
				}
			}
		})
	}

	t.Run("overwrite makes the new TPM in the format asked for", func(t *testing.T) {
		dir := setupEnv(t)
		log := filepath.Join(t.TempDir(), "setup.log")
		if code, _, stderr := setup(t, libvirtArgs(dir, log)...); code != 0 {
			t.Fatalf("swtpm_setup exit %d: %s", code, stderr)
		}
		t.Setenv(state.FormatEnv, "swtpm")
		if code, _, stderr := setup(t, "--tpm2", "--tpm-state", dir, "--overwrite", "--logfile", log); code != 0 {
			b, _ := os.ReadFile(log)
			t.Fatalf("swtpm_setup --overwrite exit %d: %s\n%s", code, stderr, b)
		}
		if !state.IsSwtpm(dir) || state.IsSealed(dir) {
			t.Errorf("after --overwrite with %s=swtpm: swtpm state %v, sealed state %v; want swtpm's alone", state.FormatEnv, state.IsSwtpm(dir), state.IsSealed(dir))
		}
	})

	t.Run("bad value", func(t *testing.T) {
		dir := setupEnv(t)
		t.Setenv(state.FormatEnv, "tpm2")
		log := filepath.Join(t.TempDir(), "setup.log")
		code, _, stderr := setup(t, libvirtArgs(dir, log)...)
		b, _ := os.ReadFile(log)
		if code == 0 || !strings.Contains(stderr+string(b), `VTPM_STATE_FORMAT: state format "tpm2"`) {
			t.Errorf("swtpm_setup with VTPM_STATE_FORMAT=tpm2: exit %d\n%s%s", code, stderr, b)
		}
	})
}
