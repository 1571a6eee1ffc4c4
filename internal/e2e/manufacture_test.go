package e2e

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vtpm/internal/manufacture"
	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// TestGuestReadsManufacturedCertificates manufactures a vTPM with libvirt's
// swtpm_setup command line through vtpm (invoked as swtpm_setup), serves it
// with vtpm swtpm socket, and checks from inside a guest that the RSA and ECC
// EK certificates are in NV, verify against the host CA with openssl, and
// certify the EKs the guest itself derives.
func TestGuestReadsManufacturedCertificates(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	testutil.Need(t, "openssl")
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	dir := qemutest.ShortTempDir(t)
	home, state := filepath.Join(dir, "home"), filepath.Join(dir, "tpm")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("VTPM_HOME", home)
	t.Setenv("VTPM_HOST_TPM", "none")

	setup := filepath.Join(dir, "swtpm_setup")
	if err := os.Symlink(testutil.Binary(t), setup); err != nil {
		t.Fatal(err)
	}
	args := []string{"--tpm2", "--tpm-state", state, "--vmid", "guest:6f1e0f3c-4c1a-4b6e-9d0e-2a8f0c9b7d11",
		"--logfile", filepath.Join(dir, "setup.log"), "--createek", "--create-ek-cert", "--create-platform-cert",
		"--lock-nvram", "--not-overwrite"}
	if out, err := exec.CommandContext(ctx, setup, args...).CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "setup.log"))
		t.Fatalf("swtpm_setup: %v\n%s\n%s", err, out, log)
	}
	caPEM, err := exec.CommandContext(ctx, testutil.Binary(t), "ca", "show", "--pem").Output()
	if err != nil {
		t.Fatalf("vtpm ca show --pem: %v", err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}

	tpm := vtpmTPM(ctx, t, home, state)
	vm, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: tpm.Socket})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []struct {
		name, index, alg string
	}{
		{"RSA", "0x1c00002", "rsa"},
		{"ECC", "0x1c0000a", "ecc"},
	} {
		t.Run(k.name, func(t *testing.T) {
			der := guestFile(ctx, t, vm, "tpm2_nvread -C o -o /tmp/cert.der "+k.index+" 2>/dev/null", "/tmp/cert.der")
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatalf("EK certificate read in the guest from NV %s does not parse: %v", k.index, err)
			}
			certFile := filepath.Join(dir, k.alg+".pem")
			if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("openssl", "verify", "-CAfile", caFile, certFile).CombinedOutput(); err != nil {
				t.Errorf("openssl verify of the %s EK certificate: %v\n%s", k.name, err, out)
			}
			ekPEM := guestFile(ctx, t, vm, "tpm2_createek -c /tmp/ek.ctx -G "+k.alg+" -u /tmp/ek.pem -f pem >/dev/null", "/tmp/ek.pem")
			blk, _ := pem.Decode(ekPEM)
			if blk == nil {
				t.Fatalf("tpm2_createek -f pem wrote no PEM: %q", ekPEM)
			}
			ek, err := x509.ParsePKIXPublicKey(blk.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			if !manufacture.PublicKeyEqual(cert.PublicKey, ek) {
				t.Errorf("the %s EK certificate's public key is not the EK the guest creates", k.name)
			}
		})
	}
	out, err := vm.Run(ctx, "tpm2_getekcertificate -o /tmp/rsa.crt -o /tmp/ecc.crt && ls /tmp/rsa.crt /tmp/ecc.crt")
	if err != nil || !strings.Contains(out, "/tmp/ecc.crt") {
		t.Errorf("tpm2_getekcertificate in the guest: %v\n%s", err, out)
	}
}

// guestFile runs command in the guest and returns the file it wrote.
func guestFile(ctx context.Context, t *testing.T, vm *qemutest.VM, command, file string) []byte {
	t.Helper()
	out, err := vm.Run(ctx, command+" && base64 "+file)
	if err != nil {
		t.Fatalf("guest: %s: %v\n%s", command, err, out)
	}
	b, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(out), ""))
	if err != nil {
		t.Fatalf("guest: %s: output is not base64: %v\n%s", command, err, out)
	}
	return b
}
