package guardian

import (
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"time"
)

// A KEM names the HPKE key encapsulation mechanism of a guardian's
// encryption key. Its value is the RFC 9180 / IANA HPKE KEM identifier.
type KEM uint16

const (
	// MLKEM768X25519 is the post-quantum hybrid KEM (ML-KEM-768 combined with
	// X25519). It is the default for guardians whose keys live in software.
	MLKEM768X25519 KEM = 0x647a

	// DHKEMP256 is DHKEM(P-256, HKDF-SHA256). Use it for guardians whose
	// encryption key lives in a TPM or HSM, which speak P-256 ECDH.
	DHKEMP256 KEM = 0x0010
)

// String returns the KEM's name as used in RFC 9180 and its successors.
func (k KEM) String() string {
	switch k {
	case MLKEM768X25519:
		return "MLKEM768-X25519"
	case DHKEMP256:
		return "DHKEM(P-256)"
	}
	return fmt.Sprintf("KEM(0x%04x)", uint16(k))
}

func (k KEM) hpke() (hpke.KEM, error) {
	switch k {
	case MLKEM768X25519:
		return hpke.MLKEM768X25519(), nil
	case DHKEMP256:
		return hpke.DHKEM(ecdh.P256()), nil
	}
	return nil, fmt.Errorf("guardian: unsupported KEM %v; use MLKEM768X25519 or DHKEMP256", k)
}

// oidHPKEPublicKey identifies the extension of a guardian's encryption
// certificate that carries its HPKE KEM id and public key. See the package
// documentation for the arc.
var oidHPKEPublicKey = asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1, 1}

// hpkeKeyExtension is the DER value of the oidHPKEPublicKey extension.
type hpkeKeyExtension struct {
	KEM       int
	PublicKey []byte
}

const (
	// hpkeSeedLabel is the HKDF info prefix that derives a guardian's HPKE
	// key from its ECDSA signing key.
	hpkeSeedLabel = "vtpm guardian hpke v1"

	encryptionUnit = "vtpm guardian encryption key"
)

// notAfter is the RFC 5280 "no well-defined expiration date" value:
// guardians are identities, not sessions, and are replaced by revocation.
var notAfter = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)

// A Guardian is a named key set that can unwrap data keys: an HPKE
// encryption key and an ECDSA P-256 signing key, each with an X.509
// certificate naming the guardian. A Guardian holds either both private keys
// or none (a public guardian, built from certificates alone).
//
// A Guardian is immutable and safe for concurrent use.
type Guardian struct {
	name     string
	kem      KEM
	signCert *x509.Certificate
	encCert  *x509.Certificate
	encPub   hpke.PublicKey
	fp       string

	signer  crypto.Signer     // nil for a public guardian
	signKey *ecdsa.PrivateKey // software key, exportable; nil if external
	encKey  hpke.PrivateKey   // nil for a public guardian
}

// New creates a guardian named name (for a host's local guardian,
// "host:" followed by the host name) with a fresh ECDSA P-256 signing key,
// an HPKE encryption key of the given KEM derived from it, and the two
// certificates.
func New(name string, kem KEM) (*Guardian, error) {
	if name == "" {
		return nil, errors.New("guardian: empty name; name the guardian, e.g. \"host:\" + hostname")
	}
	if _, err := kem.hpke(); err != nil {
		return nil, err
	}
	signKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("guardian: generating signing key: %w", err)
	}
	encKey, err := deriveHPKEKey(signKey, kem)
	if err != nil {
		return nil, err
	}
	g, err := create(name, kem, signKey, encKey.PublicKey())
	if err != nil {
		return nil, err
	}
	return g.withPrivate(signKey)
}

// NewExternal creates a DHKEM(P-256) guardian whose private keys live
// outside the process, e.g. in a TPM or HSM: signer must hold an ECDSA P-256
// key and kx a P-256 ECDH key. Such a guardian cannot be written with Marshal
// or ExportPKCS12; keep its certificates (ExportCertificates) and re-attach
// the keys after ParseCertificates with Attach.
func NewExternal(name string, signer crypto.Signer, kx ecdh.KeyExchanger) (*Guardian, error) {
	if name == "" {
		return nil, errors.New("guardian: empty name; name the guardian, e.g. \"host:\" + hostname")
	}
	if signer == nil {
		return nil, errors.New("guardian: no external signing key")
	}
	encKey, err := externalHPKEKey(kx)
	if err != nil {
		return nil, err
	}
	g, err := create(name, DHKEMP256, signer, encKey.PublicKey())
	if err != nil {
		return nil, err
	}
	return g.Attach(signer, kx)
}

func externalHPKEKey(kx ecdh.KeyExchanger) (hpke.PrivateKey, error) {
	if kx == nil || kx.Curve() != ecdh.P256() {
		return nil, errors.New("guardian: external encryption key must be a P-256 ECDH key (DHKEM(P-256))")
	}
	encKey, err := hpke.NewDHKEMPrivateKey(kx)
	if err != nil {
		return nil, fmt.Errorf("guardian: external encryption key: %w", err)
	}
	return encKey, nil
}

// create issues the signing and encryption certificates of a new guardian.
func create(name string, kem KEM, signer crypto.Signer, encPub hpke.PublicKey) (*Guardian, error) {
	signPub, ok := signer.Public().(*ecdsa.PublicKey)
	if !ok || signPub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("guardian: signing key is %T, want an ECDSA P-256 key", signer.Public())
	}
	now := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	signTmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	signDER, err := x509.CreateCertificate(rand.Reader, signTmpl, signTmpl, signPub, signer)
	if err != nil {
		return nil, fmt.Errorf("guardian: creating signing certificate: %w", err)
	}
	signCert, err := x509.ParseCertificate(signDER)
	if err != nil {
		return nil, fmt.Errorf("guardian: parsing new signing certificate: %w", err)
	}

	ext, err := asn1.Marshal(hpkeKeyExtension{KEM: int(kem), PublicKey: encPub.Bytes()})
	if err != nil {
		return nil, fmt.Errorf("guardian: encoding HPKE key extension: %w", err)
	}
	// The SubjectPublicKeyInfo carries the real key for DHKEM(P-256). X.509
	// has no encoding Go can write for the hybrid KEM, so there it holds the
	// signing key as a placeholder; the critical extension is authoritative.
	var spki any = signPub
	if kem == DHKEMP256 {
		spki, err = ecdh.P256().NewPublicKey(encPub.Bytes())
		if err != nil {
			return nil, fmt.Errorf("guardian: P-256 HPKE public key: %w", err)
		}
	}
	encTmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: name, OrganizationalUnit: []string{encryptionUnit}},
		NotBefore:             now,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageKeyAgreement,
		BasicConstraintsValid: true,
		ExtraExtensions:       []pkix.Extension{{Id: oidHPKEPublicKey, Critical: true, Value: ext}},
	}
	encDER, err := x509.CreateCertificate(rand.Reader, encTmpl, signCert, spki, signer)
	if err != nil {
		return nil, fmt.Errorf("guardian: creating encryption certificate: %w", err)
	}
	encCert, err := x509.ParseCertificate(encDER)
	if err != nil {
		return nil, fmt.Errorf("guardian: parsing new encryption certificate: %w", err)
	}
	return fromCertificates(signCert, encCert)
}

func randomSerial() *big.Int {
	b := make([]byte, 16)
	rand.Read(b)
	b[0] &= 0x7f // positive, 127 bits
	return new(big.Int).SetBytes(b)
}

// deriveHPKEKey derives the HPKE private key of a guardian from its ECDSA
// signing key, so one PKCS#8 key carries the whole guardian.
func deriveHPKEKey(signKey *ecdsa.PrivateKey, kem KEM) (hpke.PrivateKey, error) {
	k, err := kem.hpke()
	if err != nil {
		return nil, err
	}
	raw, err := signKey.Bytes()
	if err != nil {
		return nil, fmt.Errorf("guardian: signing key: %w", err)
	}
	info := hpkeSeedLabel + string(binary.BigEndian.AppendUint16(nil, uint16(kem)))
	seed, err := hkdf.Key(sha256.New, raw, nil, info, 32)
	if err != nil {
		return nil, fmt.Errorf("guardian: deriving HPKE seed: %w", err)
	}
	priv, err := k.DeriveKeyPair(seed)
	if err != nil {
		return nil, fmt.Errorf("guardian: deriving %v key: %w", kem, err)
	}
	return priv, nil
}

// verified caches the public guardians fromCertificates has checked, keyed
// by the SHA-256 of both certificates: a host loading many protectors sees
// the same few guardians in all of them, and each check costs two ECDSA
// verifications.
var verified struct {
	sync.Mutex
	m map[[sha256.Size]byte]*Guardian
}

const maxVerified = 1024

func cacheKey(signDER, encDER []byte) [sha256.Size]byte {
	h := sha256.New()
	h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(signDER))))
	h.Write(signDER)
	h.Write(encDER)
	var key [sha256.Size]byte
	h.Sum(key[:0])
	return key
}

func cached(key [sha256.Size]byte) *Guardian {
	verified.Lock()
	defer verified.Unlock()
	return verified.m[key]
}

func remember(key [sha256.Size]byte, g *Guardian) {
	verified.Lock()
	defer verified.Unlock()
	if len(verified.m) >= maxVerified || verified.m == nil {
		verified.m = make(map[[sha256.Size]byte]*Guardian)
	}
	verified.m[key] = g
}

// fromCertificates builds a public guardian from its signing and encryption
// certificates, checking that they belong together.
func fromCertificates(signCert, encCert *x509.Certificate) (*Guardian, error) {
	key := cacheKey(signCert.Raw, encCert.Raw)
	if g := cached(key); g != nil {
		return g, nil
	}
	g, err := checkCertificates(signCert, encCert)
	if err != nil {
		return nil, err
	}
	remember(key, g)
	return g, nil
}

// fromDER is fromCertificates for DER certificates.
func fromDER(signDER, encDER []byte) (*Guardian, error) {
	key := cacheKey(signDER, encDER)
	if g := cached(key); g != nil {
		return g, nil
	}
	signCert, err := x509.ParseCertificate(signDER)
	if err != nil {
		return nil, fmt.Errorf("signing certificate: %w", err)
	}
	encCert, err := x509.ParseCertificate(encDER)
	if err != nil {
		return nil, fmt.Errorf("encryption certificate: %w", err)
	}
	g, err := checkCertificates(signCert, encCert)
	if err != nil {
		return nil, err
	}
	remember(key, g)
	return g, nil
}

func checkCertificates(signCert, encCert *x509.Certificate) (*Guardian, error) {
	name := signCert.Subject.CommonName
	pub, ok := signCert.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("guardian: signing certificate %q does not hold an ECDSA P-256 key", signCert.Subject)
	}
	if name == "" {
		return nil, fmt.Errorf("guardian: signing certificate %q has no common name", signCert.Subject)
	}
	if err := signCert.CheckSignatureFrom(signCert); err != nil {
		return nil, fmt.Errorf("guardian: signing certificate of %q is not validly self-signed: %w", name, err)
	}
	if err := encCert.CheckSignatureFrom(signCert); err != nil {
		return nil, fmt.Errorf("guardian: encryption certificate was not issued by the signing certificate of %q: %w", name, err)
	}
	if encCert.Subject.CommonName != name {
		return nil, fmt.Errorf("guardian: encryption certificate names %q, signing certificate names %q", encCert.Subject.CommonName, name)
	}
	var ext *hpkeKeyExtension
	for _, e := range encCert.Extensions {
		if !e.Id.Equal(oidHPKEPublicKey) {
			continue
		}
		ext = new(hpkeKeyExtension)
		if rest, err := asn1.Unmarshal(e.Value, ext); err != nil || len(rest) != 0 {
			return nil, fmt.Errorf("guardian: malformed HPKE key extension in the encryption certificate of %q", name)
		}
	}
	if ext == nil {
		return nil, fmt.Errorf("guardian: the encryption certificate of %q has no HPKE key extension (%v); is it a vtpm guardian certificate?", name, oidHPKEPublicKey)
	}
	kem := KEM(ext.KEM)
	if ext.KEM < 0 || ext.KEM > 0xffff {
		kem = 0xffff
	}
	k, err := kem.hpke()
	if err != nil {
		return nil, fmt.Errorf("guardian %q: %w", name, err)
	}
	encPub, err := k.NewPublicKey(ext.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("guardian: invalid %v public key in the encryption certificate of %q: %w", kem, name, err)
	}
	if kem == DHKEMP256 {
		ep, ok := encCert.PublicKey.(*ecdsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("guardian: DHKEM(P-256) encryption certificate of %q does not hold a P-256 key", name)
		}
		ecdhPub, err := ep.ECDH()
		if err != nil || !bytesEqual(ecdhPub.Bytes(), ext.PublicKey) {
			return nil, fmt.Errorf("guardian: encryption certificate of %q: public key and HPKE key extension differ", name)
		}
	}
	sum := sha256.Sum256(signCert.Raw)
	return &Guardian{
		name:     name,
		kem:      kem,
		signCert: signCert,
		encCert:  encCert,
		encPub:   encPub,
		fp:       hex.EncodeToString(sum[:]),
	}, nil
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// withPrivate returns a copy of public guardian g holding signKey and the
// HPKE key derived from it, after checking both match g's certificates.
func (g *Guardian) withPrivate(signKey *ecdsa.PrivateKey) (*Guardian, error) {
	if !g.signCert.PublicKey.(*ecdsa.PublicKey).Equal(&signKey.PublicKey) {
		return nil, fmt.Errorf("guardian: private key does not match the signing certificate of %q (fingerprint %s)", g.name, g.fp)
	}
	encKey, err := deriveHPKEKey(signKey, g.kem)
	if err != nil {
		return nil, err
	}
	if !bytesEqual(encKey.PublicKey().Bytes(), g.encPub.Bytes()) {
		return nil, fmt.Errorf("guardian: HPKE key derived from the private key does not match the encryption certificate of %q (fingerprint %s)", g.name, g.fp)
	}
	c := *g
	c.signer = signKey
	c.signKey = signKey
	c.encKey = encKey
	return &c, nil
}

// Attach returns a copy of public guardian g holding private keys kept
// outside the process (see NewExternal), after checking that they match its
// certificates.
func (g *Guardian) Attach(signer crypto.Signer, kx ecdh.KeyExchanger) (*Guardian, error) {
	if g.kem != DHKEMP256 {
		return nil, fmt.Errorf("guardian: %v uses %v; only DHKEM(P-256) guardians can hold external keys", g, g.kem)
	}
	if signer == nil || !g.signCert.PublicKey.(*ecdsa.PublicKey).Equal(signer.Public()) {
		return nil, fmt.Errorf("guardian: signing key does not match the signing certificate of %v", g)
	}
	encKey, err := externalHPKEKey(kx)
	if err != nil {
		return nil, err
	}
	if !bytesEqual(encKey.PublicKey().Bytes(), g.encPub.Bytes()) {
		return nil, fmt.Errorf("guardian: encryption key does not match the encryption certificate of %v", g)
	}
	c := *g
	c.signer = signer
	c.signKey = nil
	c.encKey = encKey
	return &c, nil
}

// Name returns the guardian's name, the common name of its certificates.
func (g *Guardian) Name() string { return g.name }

// Subject returns the subject of the guardian's signing certificate in
// RFC 2253 form, e.g. "CN=host:alpha".
func (g *Guardian) Subject() string { return g.signCert.Subject.String() }

// Fingerprint returns the lowercase hex SHA-256 of the DER signing
// certificate. It identifies the guardian.
func (g *Guardian) Fingerprint() string { return g.fp }

// KEM returns the KEM of the guardian's HPKE encryption key.
func (g *Guardian) KEM() KEM { return g.kem }

// HasPrivate reports whether g holds its private keys.
func (g *Guardian) HasPrivate() bool { return g.signer != nil }

// Public returns g without its private keys.
func (g *Guardian) Public() *Guardian {
	c := *g
	c.signer = nil
	c.signKey = nil
	c.encKey = nil
	return &c
}

// SigningCertificate returns the guardian's self-signed ECDSA certificate.
// The caller must not modify it.
func (g *Guardian) SigningCertificate() *x509.Certificate { return g.signCert }

// EncryptionCertificate returns the certificate carrying the guardian's HPKE
// public key, issued by its signing certificate. The caller must not modify it.
func (g *Guardian) EncryptionCertificate() *x509.Certificate { return g.encCert }

// Equal reports whether g and h are the same guardian (same fingerprint).
func (g *Guardian) Equal(h *Guardian) bool { return h != nil && g.fp == h.fp }

// String returns the name and the first 16 hex digits of the fingerprint.
func (g *Guardian) String() string {
	return fmt.Sprintf("%s (%s)", g.name, g.fp[:16])
}
