package guardian

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"testing"
	"time"
)

func TestIssue(t *testing.T) {
	g, err := New("host:a", DHKEMP256)
	if err != nil {
		t.Fatal(err)
	}
	other, err := New("host:a", DHKEMP256) // same name, another key
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "a"}, DNSNames: []string{"a"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	cert, err := g.Issue(tmpl, &key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	byOther, err := other.Issue(tmpl, &key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Public().Issue(tmpl, &key.PublicKey); err == nil {
		t.Error("a public guardian issued a certificate")
	}
	tests := []struct {
		name string
		g    *Guardian
		cert *x509.Certificate
		ok   bool
	}{
		{"issued by it", g, cert, true},
		{"checked with its public certificates", g.Public(), cert, true},
		{"another guardian of the same name", other, cert, false},
		{"issued by another guardian", g, byOther, false},
		{"its encryption certificate", g, g.EncryptionCertificate(), true}, // the guardian issues it too
		{"nothing", g, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.g.Issued(tt.cert)
			if (err == nil) != tt.ok || err != nil && !errors.Is(err, ErrNotIssued) {
				t.Errorf("Issued = %v, want ok %v", err, tt.ok)
			}
		})
	}
}
