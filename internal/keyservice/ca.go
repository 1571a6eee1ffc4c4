package keyservice

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"slices"
	"time"

	"vtpm/internal/errdefs"
)

// Role is what a client certificate may do, carried as the certificate's
// organizational unit.
type Role string

// Roles.
const (
	RoleAdmin    Role = "admin"    // changes hosts and policies; reads
	RoleReviewer Role = "reviewer" // reads hosts, policies, the audit log, status
	RoleHost     Role = "host"     // attests and asks for keys
)

const (
	caName     = "vtpm key service CA"
	healthUnit = "vtpm health"
	serverUnit = "vtpm key service node"
	roleUnit   = "vtpm key service role "
)

// ParseRole returns the Role named s.
func ParseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RoleAdmin, RoleReviewer, RoleHost:
		return r, nil
	}
	return "", errdefs.New(errdefs.ErrInvalidArgument, "unknown role %q; use admin, reviewer or host", s)
}

// authority is the service's CA: it issues the nodes' TLS certificates,
// clients' certificates (with their role) and hosts' health certificates.
type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newAuthority() (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: caName},
		NotBefore:             now,
		NotAfter:              now.AddDate(20, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create the service CA: %w", err)
	}
	return parseAuthority(der, key)
}

func parseAuthority(der []byte, key *ecdsa.PrivateKey) (*authority, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("service CA certificate: %w", err)
	}
	if key != nil && !key.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("service CA key does not match its certificate")
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &authority{cert: cert, key: key, pool: pool}, nil
}

func serial() *big.Int {
	b := make([]byte, 16)
	rand.Read(b)
	b[0] &= 0x7f
	return new(big.Int).SetBytes(b)
}

func (a *authority) issue(tmpl *x509.Certificate, pub crypto.PublicKey) (*x509.Certificate, error) {
	tmpl.SerialNumber = serial()
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = time.Now().Add(-5 * time.Minute).UTC().Truncate(time.Second)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, pub, a.key)
	if err != nil {
		return nil, fmt.Errorf("issue a certificate for %s: %w", tmpl.Subject.CommonName, err)
	}
	return x509.ParseCertificate(der)
}

// issueServer issues node's TLS certificate for the host of apiURL (and
// loopback).
func (a *authority) issueServer(node, apiURL string, key crypto.PublicKey) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: node, OrganizationalUnit: []string{serverUnit}},
		NotAfter:    time.Now().AddDate(1, 0, 0),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost", node},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	if u, err := url.Parse(apiURL); err == nil && u.Hostname() != "" {
		if ip := net.ParseIP(u.Hostname()); ip != nil {
			if !slices.ContainsFunc(tmpl.IPAddresses, ip.Equal) {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
		} else if !slices.Contains(tmpl.DNSNames, u.Hostname()) {
			tmpl.DNSNames = append(tmpl.DNSNames, u.Hostname())
		}
	}
	return a.issue(tmpl, key)
}

// issueClient issues a client certificate of role for name.
func (a *authority) issueClient(name string, role Role, pub crypto.PublicKey) (*x509.Certificate, error) {
	return a.issue(&x509.Certificate{
		Subject:     pkix.Name{CommonName: name, OrganizationalUnit: []string{roleUnit + string(role)}},
		NotAfter:    time.Now().AddDate(5, 0, 0),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, pub)
}

// issueHealth issues host's health certificate, valid for lifetime, over
// the public key of the host's guardian.
func (a *authority) issueHealth(host string, pub crypto.PublicKey, lifetime time.Duration) (*x509.Certificate, error) {
	now := time.Now().UTC().Truncate(time.Second)
	return a.issue(&x509.Certificate{
		Subject:   pkix.Name{CommonName: host, OrganizationalUnit: []string{healthUnit}},
		NotBefore: now.Add(-time.Minute),
		NotAfter:  now.Add(lifetime),
		KeyUsage:  x509.KeyUsageDigitalSignature,
	}, pub)
}

// Identity is who a client certificate names.
type Identity struct {
	Name   string
	Role   Role
	Serial string // the certificate's serial number (hex)
}

// identityOf returns the name and role a verified client certificate
// carries.
func identityOf(c *x509.Certificate) (Identity, bool) {
	for _, ou := range c.Subject.OrganizationalUnit {
		if len(ou) > len(roleUnit) && ou[:len(roleUnit)] == roleUnit {
			r, err := ParseRole(ou[len(roleUnit):])
			if err == nil {
				return Identity{Name: c.Subject.CommonName, Role: r, Serial: c.SerialNumber.Text(16)}, true
			}
		}
	}
	return Identity{}, false
}
