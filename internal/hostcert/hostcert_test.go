package hostcert

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"testing"
	"time"

	"vtpm/internal/guardian"
)

// TestIssue: a certificate issued under one guardian verifies against that
// guardian's signing certificate, for its name and address, and carries a
// TLS 1.3 handshake with client authentication; another guardian's does
// not verify.
func TestIssue(t *testing.T) {
	a, err := guardian.New("host:a", guardian.DHKEMP256)
	if err != nil {
		t.Fatal(err)
	}
	b, err := guardian.New("host:b", guardian.DHKEMP256)
	if err != nil {
		t.Fatal(err)
	}
	ida, err := Issue(a, "a", []net.IP{net.IPv4(127, 0, 0, 2)}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	idb, err := Issue(b, "b", []net.IP{net.IPv4(127, 0, 0, 3)}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		cert   *x509.Certificate
		issuer *x509.Certificate
		name   string
		ok     bool
	}{
		{ida.Cert, a.SigningCertificate(), "a", true},
		{ida.Cert, a.SigningCertificate(), "127.0.0.2", true},
		{ida.Cert, a.SigningCertificate(), "b", false},
		{ida.Cert, b.SigningCertificate(), "a", false},
		{idb.Cert, b.SigningCertificate(), "", true},
	} {
		if err := Verify(tc.cert, tc.issuer, tc.name); (err == nil) != tc.ok {
			t.Errorf("Verify(%s by %s, %q) = %v, want ok=%v", tc.cert.Subject.CommonName, tc.issuer.Subject.CommonName, tc.name, err, tc.ok)
		}
	}
	if _, err := Issue(a.Public(), "a", nil, time.Hour); err == nil {
		t.Error("a public guardian issued a certificate")
	}

	// A real handshake: a serves, b is the client, each trusts the other's guardian.
	pair := func(id *Identity) tls.Certificate {
		c, err := tls.X509KeyPair(id.CertPEM, id.KeyPEM)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	poolOf := func(c *x509.Certificate) *x509.CertPool { p := x509.NewCertPool(); p.AddCert(c); return p }
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{pair(ida)},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: poolOf(b.SigningCertificate())})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("x"))
			c.Close()
		}
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{pair(idb)},
		RootCAs: poolOf(a.SigningCertificate()), ServerName: "a"})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := c.Read(buf); err != nil {
		t.Fatalf("read over the mutually authenticated connection: %v", err)
	}
	c.Close()
}

// Verify checks that cert was issued by the guardian signing certificate
// issuer and is valid now, for the host name or address a peer expects
// ("" skips the name).
func Verify(cert, issuer *x509.Certificate, name string) error {
	pool := x509.NewCertPool()
	pool.AddCert(issuer)
	_, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return fmt.Errorf("hostcert: certificate of %q: %w", cert.Subject.CommonName, err)
	}
	return nil
}
