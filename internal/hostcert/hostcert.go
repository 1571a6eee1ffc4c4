// Package hostcert issues a host's TLS identity under its guardian: an
// ECDSA P-256 key and a certificate signed by the guardian's signing key,
// good for both ends of a mutually authenticated connection (the host
// service's API, QEMU's migration stream and NBD). A peer verifies it
// against the guardian's signing certificate, the one `guardian export
// --certs-only` gives and whose fingerprint users compare.
package hostcert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"

	"vtpm/internal/guardian"
)

// Identity is a TLS certificate and its private key, both PEM, with the
// guardian certificate that issued it.
type Identity struct {
	Cert    *x509.Certificate
	CertPEM []byte
	// KeyPEM is the PKCS#8 private key ("PRIVATE KEY"), which Go and
	// GnuTLS (QEMU) both read.
	KeyPEM []byte
	// Issuer is the guardian's signing certificate.
	Issuer *x509.Certificate
}

// Issue makes a fresh key and has g (holding its private key) sign its
// certificate: common name host, subject alternative names host and
// ips, valid from an hour ago (clock skew) for validity.
func Issue(g *guardian.Guardian, host string, ips []net.IP, validity time.Duration) (*Identity, error) {
	if host == "" {
		return nil, errors.New("hostcert: empty host name")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("hostcert: generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	now := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: host},
		NotBefore:    now,
		NotAfter:     now.Add(time.Hour + validity),
		// GnuTLS (QEMU's x509 credentials) refuses a critical key usage
		// without key encipherment, even for ECDSA keys.
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{host},
		IPAddresses:           ips,
	}
	cert, err := g.Issue(tmpl, &key.PublicKey)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Identity{
		Cert:    cert,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		Issuer:  g.SigningCertificate(),
	}, nil
}

// CertsPEM is certs as concatenated PEM blocks.
func CertsPEM(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}
