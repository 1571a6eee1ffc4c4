package instance_test

import (
	"bytes"
	"crypto/sha256"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vtpm/internal/testutil"
)

// TestMigrationIntoEmptyDirectory moves a sealed TPM (no --migration-key)
// as QEMU does, permanent and volatile blobs into a destination started on
// an empty directory: on the same host, and on a second data root that the
// protector admits and that trusts its owner, the destination adopts the
// TPM (its NV index and PCR 16 arrive, and its directory names the TPM);
// on a data root the protector does not admit, CMD_SET_STATEBLOB fails and
// the destination's log names the TPM's guardians.
func TestMigrationIntoEmptyDirectory(t *testing.T) {
	t.Parallel()
	needTools(t)
	for _, tc := range []struct {
		name    string
		dstHome func(t *testing.T, srcHome, srcState string) string
		succeed bool
		wantLog []string // in the destination's log when it refuses
	}{
		{"same-host", func(t *testing.T, srcHome, _ string) string { return srcHome }, true, nil},
		{"admitted-host", func(t *testing.T, srcHome, srcState string) string {
			home := filepath.Join(shortDir(t), "home")
			vtpm := func(home string, args ...string) string {
				return testutil.Run(t, []string{"VTPM_HOME=" + home}, ourVtpm.exe(t), args...)
			}
			pem := filepath.Join(shortDir(t), "dst.pem")
			vtpm(home, "guardian", "export", "--certs-only", "-o", pem)
			vtpm(srcHome, "protector", "grant", srcState, pem)
			owner := filepath.Join(shortDir(t), "src.pem")
			vtpm(srcHome, "guardian", "export", "--certs-only", "-o", owner)
			vtpm(home, "guardian", "trust", owner)
			return home
		}, true, nil},
		{"admitted-host-not-trusting-the-owner", func(t *testing.T, srcHome, srcState string) string {
			home := filepath.Join(shortDir(t), "home")
			pem := filepath.Join(shortDir(t), "dst.pem")
			testutil.Run(t, []string{"VTPM_HOME=" + home}, ourVtpm.exe(t), "guardian", "export", "--certs-only", "-o", pem)
			testutil.Run(t, []string{"VTPM_HOME=" + srcHome}, ourVtpm.exe(t), "protector", "grant", srcState, pem)
			return home
		}, false, []string{"neither holds nor trusts", "guardian.trust"}},
		{"other-host", func(t *testing.T, _, _ string) string { return filepath.Join(shortDir(t), "home") }, false, []string{"guardians=", "host:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srcHome := filepath.Join(shortDir(t), "home")
			src := startTPM(t, ourVtpm, tpmConfig{transport: unixBoth, home: srcHome})
			src.mustIoctl(t, "-i")
			nv := []byte("migrated into an empty directory")
			digest := sha256.Sum256(nv)
			src.writeMarks(t, nv, digest)
			pcr := src.readPCR(t)
			dstHome := tc.dstHome(t, srcHome, src.stateDir)

			blobs := shortDir(t)
			perm, vol := filepath.Join(blobs, "permanent"), filepath.Join(blobs, "volatile")
			src.mustIoctl(t, "--save", "permanent", perm)
			src.mustIoctl(t, "--save", "volatile", vol)

			dst := startTPM(t, ourVtpm, tpmConfig{transport: unixBoth, home: dstHome})
			out, rc := dst.ioctl(t, "--load", "permanent", perm)
			if !tc.succeed {
				if rc == 0 {
					t.Fatalf("--load permanent into a host the protector does not admit succeeded: %q", out)
				}
				// The refusal is logged as the answer goes out; the copy of
				// the process's stderr may trail it.
				log := dst.Stderr.String()
				for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
					if log = dst.Stderr.String(); containsAll(log, tc.wantLog) {
						break
					}
				}
				for _, want := range tc.wantLog {
					if !strings.Contains(log, want) {
						t.Errorf("destination log does not say %q:\n%s", want, log)
					}
				}
				// The source still serves its TPM.
				if got := src.readPCR(t); got != pcr {
					t.Errorf("source PCR 16 after the refused migration = %s, want %s", got, pcr)
				}
				return
			}
			if rc != 0 {
				t.Fatalf("--load permanent: exit %d, %q\ndestination log:\n%s", rc, out, dst.Stderr)
			}
			dst.mustIoctl(t, "--load", "volatile", vol)
			src.shutdown(t)
			dst.mustIoctl(t, "-i")
			if got := dst.readPCR(t); got != pcr {
				t.Errorf("PCR 16 after migration = %s, want %s", got, pcr)
			}
			if got := dst.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("NV after migration = %q, want %q", got, nv)
			}
			id := func(dir string) string {
				return testutil.Run(t, nil, "cat", filepath.Join(dir, "vtpm-state.json"))
			}
			if a, b := id(src.stateDir), id(dst.stateDir); a != b {
				t.Errorf("destination identity %s, want the source's %s", b, a)
			}
			dst.shutdown(t)
		})
	}
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}
