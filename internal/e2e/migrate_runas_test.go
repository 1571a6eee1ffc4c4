package e2e

import (
	"context"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// TestLiveMigrationIntoEmptyDirectoryRunAs migrates a running guest into a
// destination `swtpm socket --runas tss` on an empty state directory, as
// libvirt does when storage is not shared. Once it runs as tss the
// destination cannot read the keystore: the host service, on a connection
// the destination made before it was confined, opens the TPM's key from
// the protector in the stream, writes the TPM's identity into the
// directory and hands over the key and the TPM's generation record. PCR 16
// and a loaded key arrive, the state is tss's, and the destination
// records the adopted TPM's generations at once. A host service whose data
// root the protector does not admit refuses: the migration fails, the
// source keeps running and answering, and the destination's log names the
// guardians that could open the TPM and the fix.
func TestLiveMigrationIntoEmptyDirectoryRunAs(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	if os.Geteuid() != 0 {
		testutil.Missing(t, "--runas and the host service need root")
	}
	tss, err := user.Lookup("tss")
	if err != nil {
		testutil.Missing(t, "no user tss on this host")
	}
	tssUID, _ := strconv.Atoi(tss.Uid)
	for _, tc := range []struct {
		name     string
		admitted bool
	}{{"same host", true}, {"refused host", false}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
			defer cancel()
			dir := qemutest.ShortTempDir(t)
			// tss opens its state directory by path.
			if err := os.Chmod(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			home, srcState, dstState := filepath.Join(dir, "home"), filepath.Join(dir, "src"), filepath.Join(dir, "dst")

			srcTPM := vtpmTPM(ctx, t, home, srcState)
			src, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: srcTPM.Socket, Name: "src"})
			if err != nil {
				t.Fatal(err)
			}
			digest := strings.Repeat("ef", 32)
			run(ctx, t, src, direct+"tpm2_pcrextend 16:sha256="+digest)
			run(ctx, t, src, direct+`tpm2_createprimary -Q -C o -c /tmp/p.ctx &&
	tpm2_create -Q -C 0x80000000 -G ecc -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' -u /tmp/k.pub -r /tmp/k.priv &&
	tpm2_load -Q -C 0x80000000 -u /tmp/k.pub -r /tmp/k.priv -c /tmp/k.ctx`)
			m := nameRE.FindStringSubmatch(run(ctx, t, src, direct+"tpm2_readpublic -c 0x80000001"))
			if m == nil {
				t.Fatal("no name in tpm2_readpublic output")
			}
			keyName := m[1]

			// The destination host's service: the source's data root, or one the
			// TPM's protector does not admit.
			dstHome := home
			if !tc.admitted {
				dstHome = filepath.Join(dir, "home-c")
			}
			sock := filepath.Join(dir, "host.sock")
			testutil.HostdBinary(t) // `vtpm host serve` is vtpm-hostd's, beside vtpm
			svc := testutil.StartCmd(t, exec.CommandContext(ctx, testutil.Binary(t), "host", "serve", "--socket", sock, "--data-root", dstHome), "")
			if err := svc.WaitReady(sock, 30*time.Second); err != nil {
				t.Fatalf("vtpm host serve: %v\n%s", err, svc.Stderr)
			}
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("vtpm host serve output:\n%s", svc.Stderr)
				}
			})

			if err := os.Mkdir(dstState, 0o700); err != nil {
				t.Fatal(err)
			}
			dstTPM, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{
				Command:   []string{testutil.Binary(t), "swtpm"},
				StateDir:  dstState,
				ExtraArgs: []string{"--runas", "tss"},
				Env:       []string{"VTPM_HOME=" + dstHome, "VTPM_HOST_SOCKET=" + sock},
			})
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
			err = src.Migrate(ctx, uri)
			var log []byte
			for _, f := range []string{dstTPM.LogFile, dstTPM.LogFile + ".out"} {
				b, _ := os.ReadFile(f)
				log = append(log, b...)
			}
			if !tc.admitted {
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
				for _, want := range []string{"this host cannot take the TPM from the migration stream", "guardians=", "host:", "fix="} {
					if !strings.Contains(string(log), want) {
						t.Errorf("the destination's log does not say %q:\n%s", want, log)
					}
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
			entries, err := os.ReadDir(dstState)
			if err != nil {
				t.Fatal(err)
			}
			sealed := false
			for _, e := range entries {
				st, err := os.Lstat(filepath.Join(dstState, e.Name()))
				if err != nil {
					t.Fatal(err)
				}
				if uid := int(st.Sys().(*syscall.Stat_t).Uid); uid != tssUID && e.Name() != "sock" {
					t.Errorf("%s belongs to uid %d, want tss's", e.Name(), uid)
				}
				sealed = sealed || strings.HasSuffix(e.Name(), ".sealed")
			}
			if !sealed {
				t.Errorf("no sealed state in the destination: %v", entries)
			}
			if !strings.Contains(svc.Stderr.String(), "adopted a TPM from a migration stream") {
				t.Errorf("the host service did not adopt the TPM:\n%s", svc.Stderr)
			}
			log = nil
			for _, f := range []string{dstTPM.LogFile, dstTPM.LogFile + ".out"} {
				b, _ := os.ReadFile(f)
				log = append(log, b...)
			}
			if !strings.Contains(string(log), "adopted the TPM from the migration stream") {
				t.Errorf("the destination's log does not say it adopted the TPM:\n%s", log)
			}
			if strings.Contains(string(log), "recorded on this host from its next start") {
				t.Errorf("the destination does not record the adopted TPM's generations:\n%s", log)
			}
		})
	}
}
