package e2e

import (
	"context"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// vtpmTPM starts a vtpm instance as QEMU's TPM on stateDir.
func vtpmTPM(ctx context.Context, t *testing.T, home, stateDir string, extra ...string) *qemutest.TPM {
	t.Helper()
	tpm, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{
		Command:   []string{testutil.Binary(t), "swtpm"},
		StateDir:  stateDir,
		ExtraArgs: extra,
		Env:       []string{"VTPM_HOME=" + home},
	})
	if err != nil {
		t.Fatal(err)
	}
	return tpm
}

var zeroPCR = strings.Repeat("0", 64)

// TestGuestSealSurvivesRestart boots a guest on each TPM frontend, checks
// measured boot, seals a secret to PCR 7 and writes NV, then restarts QEMU and
// vtpm from scratch and reads both back.
func TestGuestSealSurvivesRestart(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	for _, dev := range []string{"tpm-crb", "tpm-tis"} {
		t.Run(dev, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
			defer cancel()
			dir := qemutest.ShortTempDir(t)
			home, state := filepath.Join(dir, "home"), filepath.Join(dir, "tpm")
			vars := filepath.Join(dir, "vars.fd")

			tpm := vtpmTPM(ctx, t, home, state)
			vm, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: tpm.Socket, TPMDevice: dev, VarsFile: vars, Name: "first"})
			if err != nil {
				t.Fatal(err)
			}
			out, err := vm.Run(ctx, "cat /sys/class/tpm/tpm0/tpm_version_major")
			if err != nil || strings.TrimSpace(out) != "2" {
				t.Fatalf("guest TPM version: %q, %v", out, err)
			}
			for _, pcr := range []string{"0", "7"} {
				v, err := vm.Run(ctx, "tpmtest pcr "+pcr)
				if err != nil {
					t.Fatal(err)
				}
				v = strings.TrimSpace(v)
				if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(v) || v == zeroPCR {
					t.Fatalf("PCR %s after measured boot = %q, want a non-zero sha256 value", pcr, v)
				}
			}
			if _, err := vm.Run(ctx, "tpmtest seal 0x81000010 survive-restart"); err != nil {
				t.Fatal(err)
			}
			if _, err := vm.Run(ctx, "tpmtest nvwrite 0x1500020 nv-survives"); err != nil {
				t.Fatal(err)
			}
			if err := vm.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			if err := tpm.Stop(ctx); err != nil {
				t.Fatal(err)
			}

			tpm = vtpmTPM(ctx, t, home, state)
			vm, err = qemutest.Start(ctx, t, qemutest.Config{TPMSocket: tpm.Socket, TPMDevice: dev, VarsFile: vars, Name: "second"})
			if err != nil {
				t.Fatal(err)
			}
			if out, err := vm.Run(ctx, "tpmtest unseal 0x81000010"); err != nil || strings.TrimSpace(out) != "survive-restart" {
				t.Fatalf("unseal after restart: %q, %v", out, err)
			}
			if out, err := vm.Run(ctx, "tpmtest nvread 0x1500020 2>/dev/null"); err != nil || strings.TrimSpace(out) != "nv-survives" {
				t.Fatalf("nvread after restart: %q, %v", out, err)
			}
		})
	}
}
