package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"vtpm/internal/qemutest"
)

// direct bypasses the kernel's resource manager so transient objects stay loaded.
const direct = "export TPM2TOOLS_TCTI=device:/dev/tpm0; "

var nameRE = regexp.MustCompile(`(?m)^name: ([0-9a-f]+)$`)

func writeKey(t *testing.T, dir, name, hexKey string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(hexKey), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestLiveMigration migrates a running guest between two vtpm processes, the
// destination starting from an empty state directory. With the same migration
// key PCR 16 and a loaded key arrive; with another key QEMU's migration fails
// and the source keeps running.
func TestLiveMigration(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	keyA := strings.Repeat("11", 32)
	keyB := strings.Repeat("22", 32)
	for _, tc := range []struct {
		name    string
		dstKey  string
		succeed bool
	}{
		{"same-key", keyA, true},
		{"other-key", keyB, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
			defer cancel()
			dir := qemutest.ShortTempDir(t)
			home := filepath.Join(dir, "home")
			srcKey := writeKey(t, dir, "src.key", keyA)
			dstKey := writeKey(t, dir, "dst.key", tc.dstKey)

			srcTPM := vtpmTPM(ctx, t, home, filepath.Join(dir, "src"), "--migration-key", "file="+srcKey+",mode=aes-256-cbc")
			src, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: srcTPM.Socket, Name: "src"})
			if err != nil {
				t.Fatal(err)
			}
			digest := strings.Repeat("ab", 32)
			run(ctx, t, src, direct+"tpm2_pcrextend 16:sha256="+digest)
			run(ctx, t, src, direct+`tpm2_createprimary -Q -C o -c /tmp/p.ctx &&
tpm2_create -Q -C 0x80000000 -G ecc -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' -u /tmp/k.pub -r /tmp/k.priv &&
tpm2_load -Q -C 0x80000000 -u /tmp/k.pub -r /tmp/k.priv -c /tmp/k.ctx`)
			m := nameRE.FindStringSubmatch(run(ctx, t, src, direct+"tpm2_readpublic -c 0x80000001"))
			if m == nil {
				t.Fatal("no name in tpm2_readpublic output")
			}
			keyName := m[1]

			dstTPM := vtpmTPM(ctx, t, home, filepath.Join(dir, "dst"), "--migration-key", "file="+dstKey+",mode=aes-256-cbc")
			uri := "unix:" + filepath.Join(dir, "mig.sock")
			dst, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: dstTPM.Socket, Incoming: uri, Name: "dst"})
			if err != nil {
				t.Fatal(err)
			}
			// With a return path the destination reports a failed load (here: a
			// state blob it cannot decrypt) and the source resumes.
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
					t.Fatal("migration to a TPM with another migration key succeeded")
				}
				t.Logf("migration failed as expected: %v", err)
				if st, err := src.Status(ctx); err != nil || st != "running" {
					t.Fatalf("source after failed migration: %q, %v; want running", st, err)
				}
				// The source guest and its TPM still work.
				if got := strings.TrimSpace(run(ctx, t, src, "tpmtest pcr 16")); got != extendedZero(t, digest) {
					t.Fatalf("source PCR 16 after failed migration = %s", got)
				}
				run(ctx, t, src, direct+"tpm2_readpublic -c 0x80000001")
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
		})
	}
}

func run(ctx context.Context, t *testing.T, vm *qemutest.VM, cmd string) string {
	t.Helper()
	out, err := vm.Run(ctx, cmd)
	if err != nil {
		t.Fatalf("guest: %s: %v", cmd, err)
	}
	return out
}

// extendedZero is the sha256 PCR value after one extend of a zero PCR.
func extendedZero(t *testing.T, digestHex string) string {
	d, err := hex.DecodeString(digestHex)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(append(make([]byte, 32), d...))
	return hex.EncodeToString(sum[:])
}
