package manufacture

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/seal"
	"vtpm/internal/state"
)

// testHost opens a host keystore under a temporary data root and its CA.
func testHost(t *testing.T) (*keybroker.Broker, *CA) {
	t.Helper()
	h, err := keybroker.Open(t.TempDir(), keystore.Options{HostTPM: "none"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	ca, err := LoadCA(h.Keystore())
	if err != nil {
		t.Fatal(err)
	}
	return h, ca
}

func manufactureSealed(t *testing.T, h *keybroker.Broker, dir string, o Options) *Report {
	t.Helper()
	st, err := state.OpenSealed(h, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Storage.Close()
	o.Identity.TPM = st.TPM
	rep, err := Manufacture(st.Storage, o)
	if err != nil {
		t.Fatalf("Manufacture: %v", err)
	}
	return rep
}

func inspectSealed(t *testing.T, h *keybroker.Broker, dir string) *Info {
	t.Helper()
	st, err := state.OpenSealed(h, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Storage.Close()
	info, err := Inspect(st.Storage)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	return info
}

func verifyCert(t *testing.T, ca *CA, cert *x509.Certificate) {
	t.Helper()
	if _, err := cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("certificate %s does not verify against the CA: %v", cert.Subject, err)
	}
	if _, err := exec.LookPath("openssl"); err != nil {
		return
	}
	dir := t.TempDir()
	caFile, certFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "cert.pem")
	os.WriteFile(caFile, ca.PEM(), 0o600)
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o600)
	if out, err := exec.Command("openssl", "verify", "-CAfile", caFile, certFile).CombinedOutput(); err != nil {
		t.Errorf("openssl verify: %v\n%s", err, out)
	}
}

func TestManufacture(t *testing.T) {
	h, ca := testHost(t)
	tests := []struct {
		name      string
		opts      Options
		wantEKs   []string
		wantBanks []string
	}{
		{
			name:      "full, P-256, locked, sha256",
			opts:      Options{RSA: true, ECC: P256, EKCerts: true, PlatformCert: true, Lock: true, PCRBanks: []string{"sha256"}},
			wantEKs:   []string{"RSA 2048", "ECC P-256"},
			wantBanks: []string{"sha256"},
		},
		{
			name:      "P-384 like swtpm, sha1+sha256, unlocked",
			opts:      Options{RSA: true, ECC: P384, EKCerts: true, PlatformCert: true, PCRBanks: []string{"sha1", "sha256"}},
			wantEKs:   []string{"RSA 2048", "ECC P-384"},
			wantBanks: []string{"sha1", "sha256"},
		},
		{
			name:      "ECC only, platform certificate bound to it",
			opts:      Options{ECC: P256, EKCerts: true, PlatformCert: true, Lock: true, PCRBanks: []string{"sha384"}},
			wantEKs:   []string{"ECC P-256"},
			wantBanks: []string{"sha384"},
		},
		{
			name:      "EKs without certificates, banks untouched",
			opts:      Options{RSA: true, ECC: P256},
			wantEKs:   []string{"RSA 2048", "ECC P-256"},
			wantBanks: []string{"sha1", "sha256", "sha384", "sha512"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "tpm")
			tc.opts.CA = ca
			tc.opts.Identity.VM = "vm1"
			rep := manufactureSealed(t, h, dir, tc.opts)
			if !slices.Equal(rep.PCRBanks, tc.wantBanks) {
				t.Errorf("report: PCR banks %v, want %v", rep.PCRBanks, tc.wantBanks)
			}

			// Everything is read back from the state on disk, by a new TPM.
			info := inspectSealed(t, h, dir)
			var names []string
			for _, ek := range info.EKs {
				names = append(names, ek.Name)
			}
			if !slices.Equal(names, tc.wantEKs) {
				t.Fatalf("EKs in the TPM: %v, want %v", names, tc.wantEKs)
			}
			if !slices.Equal(info.PCRBanks, tc.wantBanks) {
				t.Errorf("active PCR banks: %v, want %v", info.PCRBanks, tc.wantBanks)
			}
			id, err := seal.Identify(dir)
			if err != nil {
				t.Fatal(err)
			}
			for i, ek := range info.EKs {
				if !PublicKeyEqual(ek.Public, rep.EKs[i].Public) {
					t.Errorf("%s: persistent EK differs from the one manufactured", ek.Name)
				}
				if !tc.opts.EKCerts {
					if ek.Cert != nil {
						t.Errorf("%s: certificate in NV without EKCerts", ek.Name)
					}
					continue
				}
				if ek.Cert == nil {
					t.Fatalf("%s: no certificate in NV %#x", ek.Name, uint32(ek.CertIndex))
				}
				if !PublicKeyEqual(ek.Cert.PublicKey, ek.Public) {
					t.Errorf("%s: certificate public key is not the EK", ek.Name)
				}
				if ek.Locked != tc.opts.Lock {
					t.Errorf("%s: certificate index write-locked = %v, want %v", ek.Name, ek.Locked, tc.opts.Lock)
				}
				if got := CertUUID(ek.Cert); got != id {
					t.Errorf("%s: certificate names TPM %s, want %s", ek.Name, got, id)
				}
				checkEKProfile(t, ek.Cert)
				verifyCert(t, ca, ek.Cert)
			}
			if tc.opts.PlatformCert {
				if info.PlatformCert == nil {
					t.Fatal("no platform certificate in NV 0x01c08000")
				}
				if !PublicKeyEqual(info.PlatformCert.PublicKey, info.EKs[0].Public) {
					t.Error("platform certificate is not bound to the first EK")
				}
				verifyCert(t, ca, info.PlatformCert)
			}
		})
	}
}

func checkEKProfile(t *testing.T, c *x509.Certificate) {
	t.Helper()
	if !c.BasicConstraintsValid || c.IsCA {
		t.Error("EK certificate: want basic constraints CA:false")
	}
	want := x509.KeyUsageKeyEncipherment
	if c.PublicKeyAlgorithm == x509.ECDSA {
		want = x509.KeyUsageKeyAgreement
	}
	if c.KeyUsage != want {
		t.Errorf("EK certificate key usage %v, want %v", c.KeyUsage, want)
	}
	if len(c.UnknownExtKeyUsage) != 1 || !c.UnknownExtKeyUsage[0].Equal(oidEKCertificate) {
		t.Errorf("EK certificate extended key usage %v, want %v", c.UnknownExtKeyUsage, oidEKCertificate)
	}
	var san []byte
	for _, e := range c.Extensions {
		if e.Id.Equal(oidSubjectAltName) {
			if !e.Critical {
				t.Error("EK certificate SAN is not critical")
			}
			san = e.Value
		}
	}
	for _, want := range [][]byte{[]byte(VTPMManufacturer), []byte(VTPMModel), oidBytes(oidTPMManufacturer), oidBytes(oidTPMModel), oidBytes(oidTPMVersion)} {
		if !bytes.Contains(san, want) {
			t.Errorf("EK certificate SAN lacks %q", want)
		}
	}
}

func TestTwoTPMsHaveDifferentEKs(t *testing.T) {
	h, ca := testHost(t)
	o := Options{RSA: true, ECC: P256, EKCerts: true, PlatformCert: true, Lock: true, PCRBanks: []string{"sha256"}, CA: ca}
	a := manufactureSealed(t, h, filepath.Join(t.TempDir(), "a"), o)
	b := manufactureSealed(t, h, filepath.Join(t.TempDir(), "b"), o)
	for i := range a.EKs {
		if PublicKeyEqual(a.EKs[i].Public, b.EKs[i].Public) {
			t.Errorf("%s EK is the same in two TPMs manufactured alike", a.EKs[i].Name)
		}
	}
	ca1, _ := x509.ParseCertificate(a.EKs[0].Cert)
	ca2, _ := x509.ParseCertificate(b.EKs[0].Cert)
	if CertUUID(ca1) == CertUUID(ca2) {
		t.Error("two TPMs carry the same UUID in their certificates")
	}
}

func TestCAPersists(t *testing.T) {
	h, ca := testHost(t)
	again, err := LoadCA(h.Keystore())
	if err != nil {
		t.Fatal(err)
	}
	if !again.Cert.Equal(ca.Cert) {
		t.Error("LoadCA made a second CA instead of loading the first")
	}
	if !ca.Cert.IsCA || ca.Cert.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("CA certificate: IsCA %v, key %v; want an ECDSA CA", ca.Cert.IsCA, ca.Cert.PublicKeyAlgorithm)
	}
}

func TestCertNVAttributes(t *testing.T) {
	pub := certNVPublic(IndexEKCertRSA, 1000)
	b := tpm2.Marshal(pub.Attributes)
	if got := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]); got != certNVAttributes {
		t.Errorf("NV attributes %#08x, want swtpm_setup's %#08x", got, certNVAttributes)
	}
}

func TestInspectWritesNothing(t *testing.T) {
	h, ca := testHost(t)
	dir := filepath.Join(t.TempDir(), "tpm")
	manufactureSealed(t, h, dir, Options{RSA: true, EKCerts: true, CA: ca, PCRBanks: []string{"sha256"}})
	before := snapshot(t, dir)
	inspectSealed(t, h, dir)
	if after := snapshot(t, dir); !maps.Equal(before, after) {
		t.Errorf("Inspect changed the state directory:\nbefore %v\nafter  %v", before, after)
	}
}

func TestValidate(t *testing.T) {
	_, ca := testHost(t)
	tests := []struct {
		name string
		o    Options
		ok   bool
	}{
		{"certs without CA", Options{RSA: true, EKCerts: true}, false},
		{"platform cert without EK", Options{PlatformCert: true, CA: ca}, false},
		{"unknown bank", Options{RSA: true, PCRBanks: []string{"md5"}}, false},
		{"empty bank list", Options{RSA: true, PCRBanks: []string{}}, false},
		{"PCR banks only", Options{PCRBanks: []string{"sha1", "sha256"}}, true},
		{"full", Options{RSA: true, ECC: P384, EKCerts: true, PlatformCert: true, Lock: true, CA: ca}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.o.Validate(); (err == nil) != tc.ok {
				t.Errorf("Validate() = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}
