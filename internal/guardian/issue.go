package guardian

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
)

// IssueCertificate signs a certificate for pub from tmpl with the
// guardian's signing key, its signing certificate as the issuer: a host's
// TLS certificate, so that the fingerprint a peer trusts is the one that
// authenticates the host. The template must not be a CA: the signing
// certificate allows no intermediate (path length 0).
func (g *Guardian) IssueCertificate(tmpl *x509.Certificate, pub crypto.PublicKey) (*x509.Certificate, error) {
	if g.signer == nil {
		return nil, fmt.Errorf("guardian: %v holds no private key to issue certificates with", g)
	}
	if tmpl.IsCA {
		return nil, errors.New("guardian: a guardian issues end-entity certificates only")
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, g.signCert, pub, g.signer)
	if err != nil {
		return nil, fmt.Errorf("guardian: issue certificate for %q: %w", tmpl.Subject.CommonName, err)
	}
	return x509.ParseCertificate(der)
}
