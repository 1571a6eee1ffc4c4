package manufacture

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"time"
)

// Keystore record under which the local CA is kept.
const (
	CAKind = "ca"
	CAName = "local"
)

// Records is the part of the host keystore the CA lives in: encrypted
// records by kind and name (keystore.Keystore satisfies it).
type Records interface {
	Get(kind, name string) ([]byte, error)
	Put(kind, name string, data []byte) error
}

// CA is this host's local certificate authority for EK and platform
// certificates: a self-signed ECDSA P-256 root whose private key never leaves
// the host keystore.
type CA struct {
	Cert *x509.Certificate
	key  crypto.Signer
}

type caRecord struct {
	Cert []byte `json:"cert"` // DER
	Key  []byte `json:"key"`  // PKCS#8 DER
}

// LoadCA returns the local CA kept in recs, creating it on first use.
func LoadCA(recs Records) (*CA, error) {
	b, err := recs.Get(CAKind, CAName)
	switch {
	case err == nil:
		return parseCA(b)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("read the local CA from the keystore: %w", err)
	}
	ca, rec, err := newCA()
	if err != nil {
		return nil, err
	}
	if err := recs.Put(CAKind, CAName, rec); err != nil {
		return nil, fmt.Errorf("store the new local CA in the keystore: %w", err)
	}
	return ca, nil
}

func parseCA(b []byte) (*CA, error) {
	var r caRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("the local CA record in the keystore is damaged (%v); restore the keystore from a backup", err)
	}
	cert, err := x509.ParseCertificate(r.Cert)
	if err != nil {
		return nil, fmt.Errorf("the local CA certificate in the keystore is damaged: %w", err)
	}
	k, err := x509.ParsePKCS8PrivateKey(r.Key)
	if err != nil {
		return nil, fmt.Errorf("the local CA key in the keystore is damaged: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("the local CA key in the keystore is a %T, not a signing key", k)
	}
	return &CA{Cert: cert, key: signer}, nil
}

func newCA() (*CA, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate the local CA key: %w", err)
	}
	host, _ := os.Hostname()
	if host == "" {
		host = "localhost"
	}
	now := time.Now().UTC()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "vtpm local CA " + host, Organization: []string{"vtpm"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(30, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("self-sign the local CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	pk, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	rec, _ := json.Marshal(caRecord{Cert: der, Key: pk})
	return &CA{Cert: cert, key: key}, rec, nil
}

// PEM returns the CA certificate in PEM, for `openssl verify -CAfile`.
func (c *CA) PEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Cert.Raw})
}

// Fingerprint is the SHA-256 of the CA certificate, in hex, as `openssl x509
// -fingerprint -sha256` shows it (without the colons).
func (c *CA) Fingerprint() string {
	sum := sha256.Sum256(c.Cert.Raw)
	return hex.EncodeToString(sum[:])
}

// Pool returns a pool holding the CA certificate, for x509 verification.
func (c *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Cert)
	return p
}

// randomSerial returns a positive random serial number of at most 127 bits
// (RFC 5280 allows 20 octets).
func randomSerial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n.Add(n, big.NewInt(1))
}
