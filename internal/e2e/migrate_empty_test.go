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

// TestLiveMigrationIntoEmptyDirectory migrates a running guest between two
// vtpm processes without --migration-key, the destination starting on an
// empty state directory, as libvirt does when storage is not shared. On the
// same host, and on a second data root that the TPM's protector admits and
// that trusts its owner, PCR 16 and a loaded key arrive. On a data root the
// protector does not admit, the migration fails, the source guest keeps
// running and its TPM answers, and the destination's log names the
// guardians that could open the TPM.
func TestLiveMigrationIntoEmptyDirectory(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	vtpm := func(t *testing.T, home string, args ...string) {
		t.Helper()
		testutil.Run(t, []string{"VTPM_HOME=" + home}, testutil.Binary(t), args...)
	}
	for _, tc := range []struct {
		name    string
		dstHome func(t *testing.T, dir, srcHome, srcState string) string
		succeed bool
	}{
		{"same-host", func(_ *testing.T, _, srcHome, _ string) string { return srcHome }, true},
		{"admitted-host", func(t *testing.T, dir, srcHome, srcState string) string {
			home := filepath.Join(dir, "home-b")
			dstCerts, srcCerts := filepath.Join(dir, "b.pem"), filepath.Join(dir, "a.pem")
			vtpm(t, home, "guardian", "export", "--certs-only", "-o", dstCerts)
			vtpm(t, srcHome, "protector", "grant", srcState, dstCerts)
			vtpm(t, srcHome, "guardian", "export", "--certs-only", "-o", srcCerts)
			vtpm(t, home, "guardian", "trust", srcCerts)
			return home
		}, true},
		{"refused-host", func(_ *testing.T, dir, _, _ string) string { return filepath.Join(dir, "home-c") }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
			defer cancel()
			dir := qemutest.ShortTempDir(t)
			srcHome, srcState := filepath.Join(dir, "home"), filepath.Join(dir, "src")

			srcTPM := vtpmTPM(ctx, t, srcHome, srcState)
			src, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: srcTPM.Socket, Name: "src"})
			if err != nil {
				t.Fatal(err)
			}
			digest := strings.Repeat("cd", 32)
			run(ctx, t, src, direct+"tpm2_pcrextend 16:sha256="+digest)
			run(ctx, t, src, direct+`tpm2_createprimary -Q -C o -c /tmp/p.ctx &&
tpm2_create -Q -C 0x80000000 -G ecc -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' -u /tmp/k.pub -r /tmp/k.priv &&
tpm2_load -Q -C 0x80000000 -u /tmp/k.pub -r /tmp/k.priv -c /tmp/k.ctx`)
			m := nameRE.FindStringSubmatch(run(ctx, t, src, direct+"tpm2_readpublic -c 0x80000001"))
			if m == nil {
				t.Fatal("no name in tpm2_readpublic output")
			}
			keyName := m[1]

			dstHome := tc.dstHome(t, dir, srcHome, srcState)
			dstState := filepath.Join(dir, "dst")
			if err := os.Mkdir(dstState, 0o700); err != nil {
				t.Fatal(err)
			}
			dstTPM := vtpmTPM(ctx, t, dstHome, dstState)
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
			err = src.Migrate(ctx, uri)
			if !tc.succeed {
				if err == nil {
					t.Fatal("migration to a host the TPM's protector does not admit succeeded")
				}
				t.Logf("migration failed as expected: %v", err)
				if st, err := src.Status(ctx); err != nil || st != "running" {
					t.Fatalf("source after failed migration: %q, %v; want running", st, err)
				}
				if got := strings.TrimSpace(run(ctx, t, src, "tpmtest pcr 16")); got != extendedZero(t, digest) {
					t.Fatalf("source PCR 16 after failed migration = %s", got)
				}
				run(ctx, t, src, direct+"tpm2_readpublic -c 0x80000001")
				var log []byte
				for _, f := range []string{dstTPM.LogFile, dstTPM.LogFile + ".out"} {
					b, _ := os.ReadFile(f)
					log = append(log, b...)
				}
				if !strings.Contains(string(log), "guardians=") || !strings.Contains(string(log), "host:") {
					t.Errorf("the destination's log does not name the TPM's guardians:\n%s", log)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := dst.WaitStatus(ctx, "running"); err != nil {
				t.Fatal(err)
			}
			if got := strings.TrimSpace(run(ctx, t, dst, "tpmtest pcr 16")); got != extendedZero(t, digest) {
				t.Errorf("PCR 16 after migration = %s, want %s", got, extendedZero(t, digest))
			}
			m = nameRE.FindStringSubmatch(run(ctx, t, dst, direct+"tpm2_readpublic -c 0x80000001"))
			if m == nil || m[1] != keyName {
				t.Errorf("loaded key after migration: %v, want name %s", m, keyName)
			}
			run(ctx, t, dst, direct+`echo migrated > /tmp/msg &&
tpm2_sign -c 0x80000001 -g sha256 -o /tmp/sig /tmp/msg &&
tpm2_verifysignature -c 0x80000001 -g sha256 -m /tmp/msg -s /tmp/sig`)
			a, _ := os.ReadFile(filepath.Join(srcState, "vtpm-state.json"))
			b, _ := os.ReadFile(filepath.Join(dstState, "vtpm-state.json"))
			if len(a) == 0 || string(a) != string(b) {
				t.Errorf("destination identity %q, want the source's %q", b, a)
			}
		})
	}
}
