package hostd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keystore"
)

// The host's TLS key and certificate live in the keystore (encrypted under
// its master key), one PEM record: the key, then the certificate.
const (
	kindTLS = "host-tls"
	nameTLS = "tls"
)

// certLifetime is how long a host certificate is issued for, and
// renewBefore how long before its end a start issues a new one. Peers pin
// the guardian, not the certificate, so renewing changes nothing for them.
const (
	certLifetime = 365 * 24 * time.Hour
	renewBefore  = 30 * 24 * time.Hour
)

// hostCertificate returns the host's TLS certificate for the given name and
// addresses, issued under g: the one in the keystore when g issued it and
// it names them, else a new key and certificate, stored.
func hostCertificate(ks *keystore.Keystore, g *guardian.Guardian, name string, ips []net.IP) (tls.Certificate, error) {
	if c, ok := storedCertificate(ks, g, name, ips); ok {
		return c, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial := make([]byte, 16)
	rand.Read(serial)
	serial[0] &= 0x7f
	now := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	leaf, err := g.Issue(&x509.Certificate{
		SerialNumber: new(big.Int).SetBytes(serial),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		IPAddresses:  ips,
		NotBefore:    now,
		NotAfter:     now.Add(certLifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}, &key.PublicKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return tls.Certificate{}, err
	}
	rec := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	rec = append(rec, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf.Raw})...)
	if err := ks.Put(kindTLS, nameTLS, rec); err != nil {
		return tls.Certificate{}, fmt.Errorf("store the host's TLS key: %w", err)
	}
	return chain(key, leaf, g), nil
}

// storedCertificate is the keystore's certificate when it still serves.
func storedCertificate(ks *keystore.Keystore, g *guardian.Guardian, name string, ips []net.IP) (tls.Certificate, bool) {
	rec, err := ks.Get(kindTLS, nameTLS)
	if err != nil {
		return tls.Certificate{}, false
	}
	var key *ecdsa.PrivateKey
	var leaf *x509.Certificate
	for b, rest := pem.Decode(rec); b != nil; b, rest = pem.Decode(rest) {
		switch b.Type {
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
			if err == nil {
				key, _ = k.(*ecdsa.PrivateKey)
			}
		case "CERTIFICATE":
			leaf, _ = x509.ParseCertificate(b.Bytes)
		}
	}
	if key == nil || leaf == nil || !key.PublicKey.Equal(leaf.PublicKey) || g.Issued(leaf) != nil ||
		time.Until(leaf.NotAfter) < renewBefore || !slices.Equal(leaf.DNSNames, []string{name}) ||
		!slices.EqualFunc(leaf.IPAddresses, ips, net.IP.Equal) {
		return tls.Certificate{}, false
	}
	return chain(key, leaf, g), true
}

// chain is what the host presents: its certificate, then its guardian's
// signing certificate, so a peer that no longer recognises it can say which
// guardian it now names.
func chain(key *ecdsa.PrivateKey, leaf *x509.Certificate, g *guardian.Guardian) tls.Certificate {
	return tls.Certificate{
		Certificate: [][]byte{leaf.Raw, g.SigningCertificate().Raw},
		PrivateKey:  key,
		Leaf:        leaf,
	}
}

// certInfo is a certificate chain a peer presented.
type certInfo struct {
	leaf *x509.Certificate
	// guardianFingerprint is the fingerprint of the chain's second
	// certificate, the guardian the peer says issued its certificate; ""
	// when it sent none.
	guardianFingerprint string
}

// parseChain parses a presented chain: a leaf valid now, for usage (a
// guardian issues other certificates than hosts', such as its own
// encryption certificate, and those carry no TLS usage).
func parseChain(raw [][]byte, usage x509.ExtKeyUsage) (*certInfo, error) {
	if len(raw) == 0 {
		return nil, errors.New("no certificate presented")
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return nil, fmt.Errorf("presented certificate: %w", err)
	}
	now := time.Now()
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("presented certificate %q is valid from %s to %s only", leaf.Subject.CommonName, leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))
	}
	if !slices.Contains(leaf.ExtKeyUsage, usage) {
		return nil, fmt.Errorf("presented certificate %q is not for TLS (extended key usage %v)", leaf.Subject.CommonName, leaf.ExtKeyUsage)
	}
	ci := &certInfo{leaf: leaf}
	if len(raw) > 1 {
		ci.guardianFingerprint = fingerprint(raw[1])
	}
	return ci, nil
}

// CertChangedError reports a peer whose certificate is not issued under the
// guardian this host trusts it with: its guardian changed, or another host
// answers at its address. The connection was refused.
type CertChangedError struct {
	Peer    string
	Address string
	// Trusted is the fingerprint of the guardian trusted for the peer;
	// Presented the one its certificate came with ("" when it sent none).
	Trusted, Presented string
}

func (e *CertChangedError) Error() string {
	presented := "no guardian certificate"
	if e.Presented != "" {
		presented = "guardian fingerprint " + e.Presented
	}
	return fmt.Sprintf("host %s (%s) presented a certificate not issued by its trusted guardian (fingerprint %s) but with %s; refused: its guardian changed, or another host answers at its address",
		e.Peer, e.Address, e.Trusted, presented)
}

// Is makes the error match errdefs.ErrPermissionDenied.
func (e *CertChangedError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

// Remedies: check the new guardian on the peer, then trust it again.
func (e *CertChangedError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Do(errdefs.ActionGuardianExportCerts, "file", e.Peer+".pem").
			WithNote("if the change is genuine, export the guardian's certificates and check its fingerprint").On("on host " + e.Peer),
		errdefs.Do(errdefs.ActionHostUntrust, "name", e.Peer).WithNote("then replace the trusted ones: untrust the host"),
		errdefs.Do(errdefs.ActionHostTrust, "name", e.Peer, "address", e.Address, "certs", e.Peer+".pem").WithNote("and trust it again"),
	}
}

// fingerprint is a DER certificate's SHA-256 in lowercase hex: a
// guardian's fingerprint when it is a guardian's signing certificate.
func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// certificate is the host's certificate, renewed when it nears its end
// (a service runs for longer than a certificate lasts); on a failed
// renewal the current one serves while it is valid.
func (s *Server) certificate() (*tls.Certificate, error) {
	s.certMu.Lock()
	defer s.certMu.Unlock()
	if time.Until(s.cert.Leaf.NotAfter) < renewBefore {
		c, err := hostCertificate(s.broker.Keystore(), s.local, s.opts.Name, s.ips)
		if err == nil {
			s.cert = c
			s.log.Info("renewed the host's TLS certificate", "not_after", c.Leaf.NotAfter)
		} else {
			s.log.Error("cannot renew the host's TLS certificate", "err", err, "not_after", s.cert.Leaf.NotAfter)
		}
	}
	c := s.cert
	return &c, nil
}

// serverTLS admits clients whose certificates a trusted peer's guardian
// issued; peers is read at each handshake.
func serverTLS(cert func() (*tls.Certificate, error), peers func() []*Peer) *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cert() },
		ClientAuth:     tls.RequireAnyClientCert,
		// The chain is verified against the peers' guardians, not a CA.
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			ci, err := parseChain(raw, x509.ExtKeyUsageClientAuth)
			if err != nil {
				return err
			}
			if issuer(peers(), ci) == nil {
				return fmt.Errorf("certificate of %q is issued by no trusted host's guardian (presented guardian %s)", ci.leaf.Subject.CommonName, orNone(ci.guardianFingerprint))
			}
			return nil
		},
	}
}

// clientTLS accepts only a certificate issued under p's guardian.
func clientTLS(cert func() (*tls.Certificate, error), p *Peer) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert() },
		InsecureSkipVerify:   true, // verified below, against p's guardian
		NextProtos:           []string{"h2"},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return verifyPeer(p, raw)
		},
	}
}

func verifyPeer(p *Peer, raw [][]byte) error {
	ci, err := parseChain(raw, x509.ExtKeyUsageServerAuth)
	if err != nil {
		return err
	}
	if p.g.Issued(ci.leaf) != nil {
		return &CertChangedError{Peer: p.Name, Address: p.Address, Trusted: p.g.Fingerprint(), Presented: ci.guardianFingerprint}
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
