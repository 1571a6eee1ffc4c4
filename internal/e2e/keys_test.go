package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// TestMigrationBetweenHosts live-migrates a guest from host A to host B
// (two data roots on this machine, see hosts_test.go), the destination vTPM
// starting on a copy of the source's protector.json and vtpm-state.json in
// an empty directory. While no guardian of B can open the protector, the
// destination vTPM refuses to start, before QEMU is started, with the
// guardian-listing error, and the source guest and its TPM carry on. Once A
// grants B's guardian and B trusts A's, the migration carries PCR 16 over:
// the migration key both sides derive from the TPM's data key matches.
func TestMigrationBetweenHosts(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	a, b := newVHost(t, "a"), newVHost(t, "b")
	fpA, fpB := a.fingerprint(t), b.fingerprint(t)
	dir := qemutest.ShortTempDir(t)
	srcState, dstState := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	startTPM := func(h *vhost, state string) (*qemutest.TPM, error) {
		return qemutest.StartTPM(ctx, t, qemutest.TPMConfig{
			Command:  []string{testutil.Binary(t), "swtpm"},
			StateDir: state,
			Env:      h.environ(),
		})
	}

	srcTPM, err := startTPM(a, srcState)
	if err != nil {
		t.Fatal(err)
	}
	src, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: srcTPM.Socket, Name: "src"})
	if err != nil {
		t.Fatal(err)
	}
	digest := strings.Repeat("cd", 32)
	run(ctx, t, src, direct+"tpm2_pcrextend 16:sha256="+digest)
	want := extendedZero(t, digest)

	if err := os.Mkdir(dstState, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"protector.json", "vtpm-state.json"} {
		copyFile(t, f, srcState, dstState)
	}

	t.Run("B cannot open the protector", func(t *testing.T) {
		_, err := startTPM(b, dstState)
		if err == nil {
			t.Fatal("the destination vTPM started on B, which holds no guardian of the TPM")
		}
		checkGuardianError(t, err.Error(), dstState, []string{fpA}, []string{fpB})
		if _, err := os.Stat(filepath.Join(dstState, "sock")); err == nil {
			t.Error("the refused vTPM left its control socket")
		}
		if st, err := src.Status(ctx); err != nil || st != "running" {
			t.Fatalf("source guest: %q, %v; want running", st, err)
		}
		if got := strings.TrimSpace(run(ctx, t, src, "tpmtest pcr 16")); got != want {
			t.Fatalf("source PCR 16 = %s, want %s", got, want)
		}
	})
	if t.Failed() {
		return
	}

	t.Run("B granted", func(t *testing.T) {
		// Granted on A while its vTPM serves the guest; the protector
		// travels to B again.
		pem := filepath.Join(t.TempDir(), "b.pem")
		b.vtpm(t, "guardian", "export", "--certs-only", "-o", pem)
		a.vtpm(t, "protector", "grant", srcState, pem)
		copyFile(t, "protector.json", srcState, dstState)
		// B opens only protectors whose owner it holds or trusts.
		ownerPEM := filepath.Join(t.TempDir(), "a.pem")
		a.vtpm(t, "guardian", "export", "--certs-only", "-o", ownerPEM)
		b.vtpm(t, "guardian", "trust", ownerPEM)

		dstTPM, err := startTPM(b, dstState)
		if err != nil {
			t.Fatal(err)
		}
		uri := "unix:" + filepath.Join(dir, "mig.sock")
		dst, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: dstTPM.Socket, Incoming: uri, Name: "dst"})
		if err != nil {
			t.Fatal(err)
		}
		for _, vm := range []*qemutest.VM{src, dst} {
			if _, err := vm.QMP(ctx, "migrate-set-capabilities", map[string]any{
				"capabilities": []map[string]any{{"capability": "return-path", "state": true}},
			}); err != nil {
				t.Fatal(err)
			}
		}
		if err := src.Migrate(ctx, uri); err != nil {
			t.Fatal(err)
		}
		if err := dst.WaitStatus(ctx, "running"); err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(run(ctx, t, dst, "tpmtest pcr 16")); got != want {
			t.Errorf("PCR 16 on B after migration = %s, want %s", got, want)
		}
	})
}
