package guardian

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
)

// Issue signs a certificate for pub from tmpl with g's signing key, g's
// signing certificate as its issuer. A host service's TLS certificate is
// issued this way, so the guardian's fingerprint, the one users compare,
// is what authenticates the host. g must hold its private keys.
func (g *Guardian) Issue(tmpl *x509.Certificate, pub crypto.PublicKey) (*x509.Certificate, error) {
	if g.signer == nil {
		return nil, fmt.Errorf("guardian: %v holds no private key to issue a certificate with", g)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, g.signCert, pub, g.signer)
	if err != nil {
		return nil, fmt.Errorf("guardian: issuing a certificate under %v: %w", g, err)
	}
	return x509.ParseCertificate(der)
}

// ErrNotIssued reports a certificate that g's signing key did not sign.
var ErrNotIssued = errors.New("guardian: certificate not issued under this guardian's signing key")

// Issued checks that cert was issued under g's signing key (see Issue):
// its issuer is g's subject and g's signing key signed it.
func (g *Guardian) Issued(cert *x509.Certificate) error {
	if cert == nil || string(cert.RawIssuer) != string(g.signCert.RawSubject) {
		return ErrNotIssued
	}
	if err := g.signCert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature); err != nil {
		return ErrNotIssued
	}
	return nil
}
