package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// TestSwtpmStateUnsealsUnderVtpm: a guest seals a secret to PCR 7 under the
// real swtpm (plain state, and state encrypted with --key); vtpm then serves
// that state in place, and again after `vtpm state import` converted it to
// sealed state, and the guest unseals the secret both times.
func TestSwtpmStateUnsealsUnderVtpm(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	testutil.Need(t, "swtpm")
	for _, tc := range []struct {
		name string
		key  bool
	}{{"plain", false}, {"key-encrypted", true}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			dir := qemutest.ShortTempDir(t)
			home, state := filepath.Join(dir, "home"), filepath.Join(dir, "tpm")
			vars := filepath.Join(dir, "vars.fd")
			var keyArgs []string
			if tc.key {
				pw := filepath.Join(dir, "pw")
				if err := os.WriteFile(pw, []byte("libvirt secret"), 0o600); err != nil {
					t.Fatal(err)
				}
				keyArgs = []string{"--key", "pwdfile=" + pw + ",mode=aes-256-cbc"}
			}
			boot := func(name string, cmd []string, args []string) (*qemutest.TPM, *qemutest.VM) {
				t.Helper()
				tpm, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{Command: cmd, StateDir: state, ExtraArgs: args, Env: []string{"VTPM_HOME=" + home}})
				if err != nil {
					t.Fatal(err)
				}
				vm, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: tpm.Socket, VarsFile: vars, Name: name})
				if err != nil {
					t.Fatal(err)
				}
				return tpm, vm
			}
			stop := func(tpm *qemutest.TPM, vm *qemutest.VM) {
				t.Helper()
				if err := vm.Stop(ctx); err != nil {
					t.Fatal(err)
				}
				if err := tpm.Stop(ctx); err != nil {
					t.Fatal(err)
				}
			}
			unseal := func(vm *qemutest.VM) {
				t.Helper()
				if out, err := vm.Run(ctx, "tpmtest unseal 0x81000011"); err != nil || strings.TrimSpace(out) != "sealed-by-swtpm" {
					t.Fatalf("unseal: %q, %v", out, err)
				}
			}

			tpm, vm := boot("swtpm", []string{"swtpm"}, keyArgs)
			run(ctx, t, vm, "tpmtest seal 0x81000011 sealed-by-swtpm")
			stop(tpm, vm)
			if _, err := os.Stat(filepath.Join(state, "tpm2-00.permall")); err != nil {
				t.Fatalf("swtpm left no state: %v", err)
			}

			vtpm := []string{testutil.Binary(t), "swtpm"}
			tpm, vm = boot("in-place", vtpm, keyArgs)
			unseal(vm)
			stop(tpm, vm)

			imp := exec.CommandContext(ctx, testutil.Binary(t), append([]string{"state", "import"}, append(keyArgs, state)...)...)
			imp.Env = append(os.Environ(), "VTPM_HOME="+home)
			if out, err := imp.CombinedOutput(); err != nil {
				t.Fatalf("vtpm state import: %v\n%s", err, out)
			}
			if _, err := os.Stat(filepath.Join(state, "tpm2-00.permall")); err == nil {
				t.Fatal("state import left tpm2-00.permall in place")
			}
			tpm, vm = boot("imported", vtpm, nil)
			unseal(vm)
			stop(tpm, vm)
		})
	}
}
