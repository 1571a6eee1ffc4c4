// Package client is the key service's client: the bundle a client keeps
// (its certificate, key, the service CA and every node's URL), calls that
// fail over from node to node, and a host's attest-and-release. It links
// the API and Connect, never etcd, so the host service and the CLI can use
// it.
package client

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
)

// Bundle is what a client needs to reach the key service: its name and
// role, its certificate and private key, the service CA, and every node's
// API URL. It is written as JSON, mode 0600 (it holds the private key).
type Bundle struct {
	Name      string   `json:"name"`
	Role      string   `json:"role"`
	Endpoints []string `json:"endpoints"`
	CA        []byte   `json:"ca"`   // PEM
	Cert      []byte   `json:"cert"` // PEM
	Key       []byte   `json:"key"`  // PEM, PKCS#8
}

// NewKey returns a fresh ECDSA P-256 key for a client certificate and its
// PKIX public key.
func NewKey() (*ecdsa.PrivateKey, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	return k, pub, err
}

// NewBundle assembles a bundle from an issued certificate (DER) and the
// key it was issued for.
func NewBundle(name, role string, endpoints []string, caDER, certDER []byte, key *ecdsa.PrivateKey) (*Bundle, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Bundle{
		Name: name, Role: role, Endpoints: endpoints,
		CA:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		Cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER}),
		Key:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
	}, nil
}

// ReadBundle reads a bundle file.
func ReadBundle(path string) (*Bundle, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, errdefs.Wrap(errdefs.ErrNotFound, err, "key service client bundle").With(
				errdefs.Advise("use the bundle that init wrote, or ask an admin of the key service for one"))
		}
		return nil, err
	}
	var bd Bundle
	if err := json.Unmarshal(b, &bd); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "%s is not a key service client bundle", path)
	}
	if len(bd.Endpoints) == 0 {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "client bundle %s names no key service node", path)
	}
	return &bd, nil
}

// Write writes the bundle to path, mode 0600.
func (b *Bundle) Write(path string) error {
	data, err := json.MarshalIndent(b, "", "\t")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(data, '\n'), 0o600)
}

// TLSConfig is the client side of the API's TLS: 1.3, the bundle's
// certificate, the service CA as the only root.
func (b *Bundle) TLSConfig() (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b.CA) {
		return nil, fmt.Errorf("client bundle %s: no CA certificate", b.Name)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, NextProtos: []string{"h2"}}
	if len(b.Cert) > 0 {
		cert, err := tls.X509KeyPair(b.Cert, b.Key)
		if err != nil {
			return nil, fmt.Errorf("client bundle %s: %w", b.Name, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}
