package main

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"path/filepath"
	"strings"
	"testing"
)

func runVTPM(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	root := rootCmd()
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestTPMManufactureAndShow(t *testing.T) {
	setupEnv(t)
	tests := []struct {
		name      string
		args      []string
		wantEKs   []string
		wantBanks []string
		platform  bool
	}{
		{"defaults", nil, []string{"RSA 2048", "ECC P-256"}, []string{"sha256"}, true},
		{"P-384 and two banks", []string{"--ecc", "p384", "--pcr-banks", "sha1,sha256"}, []string{"RSA 2048", "ECC P-384"}, []string{"sha1", "sha256"}, true},
		{"ECC only, no certificates", []string{"--no-rsa", "--no-certs"}, []string{"ECC P-256"}, []string{"sha256"}, false},
	}
	ca, err := runVTPM(t, "ca", "show", "--pem")
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(ca))
	if blk == nil {
		t.Fatalf("vtpm ca show --pem printed no PEM: %q", ca)
	}
	caCert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(caCert)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "tpm")
			if out, err := runVTPM(t, append([]string{"tpm", "manufacture", dir}, tc.args...)...); err != nil {
				t.Fatalf("manufacture: %v\n%s", err, out)
			}
			out, err := runVTPM(t, "tpm", "show", dir, "--json")
			if err != nil {
				t.Fatalf("show: %v\n%s", err, out)
			}
			var shown struct {
				TPM string
				EKs []struct {
					Name        string
					Certificate *struct {
						PEM     string
						TPMUUID string `json:"tpm_uuid"`
					}
				}
				PCRBanks  []string `json:"pcr_banks"`
				Platform  any      `json:"platform_certificate"`
				Protector []any
			}
			if err := json.Unmarshal([]byte(out), &shown); err != nil {
				t.Fatalf("show --json: %v\n%s", err, out)
			}
			var names []string
			for _, ek := range shown.EKs {
				names = append(names, ek.Name)
				if tc.platform != (ek.Certificate != nil) {
					t.Fatalf("%s: certificate present = %v, want %v", ek.Name, ek.Certificate != nil, tc.platform)
				}
				if ek.Certificate == nil {
					continue
				}
				b, _ := pem.Decode([]byte(ek.Certificate.PEM))
				c, err := x509.ParseCertificate(b.Bytes)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
					t.Errorf("%s certificate does not verify against `vtpm ca show --pem`: %v", ek.Name, err)
				}
				if ek.Certificate.TPMUUID != shown.TPM {
					t.Errorf("%s certificate names TPM %q, want %q", ek.Name, ek.Certificate.TPMUUID, shown.TPM)
				}
			}
			if strings.Join(names, ",") != strings.Join(tc.wantEKs, ",") || strings.Join(shown.PCRBanks, ",") != strings.Join(tc.wantBanks, ",") {
				t.Errorf("EKs %v, banks %v; want %v, %v", names, shown.PCRBanks, tc.wantEKs, tc.wantBanks)
			}
			if (shown.Platform != nil) != tc.platform || len(shown.Protector) != 1 {
				t.Errorf("platform certificate %v, protector rows %d; want %v, 1", shown.Platform != nil, len(shown.Protector), tc.platform)
			}
			if _, err := runVTPM(t, "tpm", "manufacture", dir); err == nil || !strings.Contains(err.Error(), "--overwrite") {
				t.Errorf("manufacturing over an existing TPM: %v, want a refusal naming --overwrite", err)
			}
		})
	}
}
