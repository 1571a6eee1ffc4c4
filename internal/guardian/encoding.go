package guardian

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"software.sslmate.com/src/go-pkcs12"

	"vtpm/internal/errdefs"
)

// ErrWrongPassword is returned by ImportPKCS12 when the password does not
// open the file (errdefs.ErrPermissionDenied).
var ErrWrongPassword error = errdefs.New(errdefs.ErrPermissionDenied, "guardian: wrong PKCS#12 password")

const (
	pemCertificate = "CERTIFICATE"
	pemPrivateKey  = "PRIVATE KEY"
)

// Marshal encodes g for a keystore as PEM: the signing certificate, the
// encryption certificate and, if g holds it, the PKCS#8 ECDSA private key
// (from which the HPKE key is derived). Parse reverses it.
func (g *Guardian) Marshal() ([]byte, error) {
	b, err := g.ExportCertificates()
	if err != nil {
		return nil, err
	}
	if g.signer == nil {
		return b, nil
	}
	if g.signKey == nil {
		return nil, fmt.Errorf("guardian: the private keys of %v are held outside this process (TPM or HSM) and cannot be written; store its certificates (ExportCertificates) and re-attach the keys with Attach", g)
	}
	der, err := x509.MarshalPKCS8PrivateKey(g.signKey)
	if err != nil {
		return nil, fmt.Errorf("guardian: encoding private key of %v: %w", g, err)
	}
	return append(b, pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: der})...), nil
}

// ExportCertificates returns g's public part as PEM: the signing certificate
// then the encryption certificate. Another host grants g with it (see
// ParseCertificates); no private key ever has to move.
func (g *Guardian) ExportCertificates() ([]byte, error) {
	var b bytes.Buffer
	for _, c := range []*x509.Certificate{g.signCert, g.encCert} {
		if err := pem.Encode(&b, &pem.Block{Type: pemCertificate, Bytes: c.Raw}); err != nil {
			return nil, err
		}
	}
	return b.Bytes(), nil
}

// Parse decodes a guardian encoded by Marshal, with or without its private
// key.
func Parse(data []byte) (*Guardian, error) {
	return parsePEM(data, true)
}

// ParseCertificates decodes a public guardian from the PEM certificates
// written by ExportCertificates. It refuses input holding a private key, so
// a key sent by mistake is noticed rather than silently dropped.
func ParseCertificates(data []byte) (*Guardian, error) {
	return parsePEM(data, false)
}

// ReadCertificates is ParseCertificates of the file at path; its errors
// name the file.
func ReadCertificates(path string) (*Guardian, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	g, err := ParseCertificates(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return g, nil
}

func parsePEM(data []byte, allowKey bool) (*Guardian, error) {
	var certs []*x509.Certificate
	var key *ecdsa.PrivateKey
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			if len(bytes.TrimSpace(rest)) != 0 {
				return nil, errors.New("guardian: trailing data that is not PEM; the input may be truncated or corrupt")
			}
			break
		}
		switch block.Type {
		case pemCertificate:
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("guardian: certificate %d: %w", len(certs)+1, err)
			}
			certs = append(certs, c)
		case pemPrivateKey:
			if !allowKey {
				return nil, errors.New("guardian: input contains a PRIVATE KEY; ParseCertificates reads public certificates only — export with ExportCertificates, and keep the private key where it is")
			}
			if key != nil {
				return nil, errors.New("guardian: more than one PRIVATE KEY block")
			}
			k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("guardian: private key: %w", err)
			}
			ek, ok := k.(*ecdsa.PrivateKey)
			if !ok {
				return nil, fmt.Errorf("guardian: private key is %T, want an ECDSA P-256 key", k)
			}
			key = ek
		default:
			return nil, fmt.Errorf("guardian: unexpected PEM block %q; want CERTIFICATE or PRIVATE KEY", block.Type)
		}
	}
	signCert, encCert, err := splitCertificates(certs)
	if err != nil {
		return nil, err
	}
	g, err := fromCertificates(signCert, encCert)
	if err != nil {
		return nil, err
	}
	if key == nil {
		return g, nil
	}
	return g.withPrivate(key)
}

// splitCertificates finds the signing and encryption certificates among
// certs, in any order: the encryption certificate is the one carrying the
// HPKE key extension.
func splitCertificates(certs []*x509.Certificate) (signCert, encCert *x509.Certificate, err error) {
	if len(certs) != 2 {
		return nil, nil, fmt.Errorf("guardian: found %d certificates, want 2 (signing and encryption)", len(certs))
	}
	for _, c := range certs {
		if hasHPKEExtension(c) {
			if encCert != nil {
				return nil, nil, errors.New("guardian: two encryption certificates and no signing certificate")
			}
			encCert = c
		} else {
			signCert = c
		}
	}
	if encCert == nil {
		return nil, nil, fmt.Errorf("guardian: no certificate carries the vtpm HPKE key extension (%v); is this a vtpm guardian?", oidHPKEPublicKey)
	}
	return signCert, encCert, nil
}

func hasHPKEExtension(c *x509.Certificate) bool {
	for _, e := range c.Extensions {
		if e.Id.Equal(oidHPKEPublicKey) {
			return true
		}
	}
	return false
}

// ExportPKCS12 encodes g, private key included, as a PKCS#12 file protected
// by password (PBES2 with PBKDF2-HMAC-SHA-256 and AES-256-CBC, HMAC-SHA-256
// MAC: OpenSSL 1.1.1 and later read it). The file holds one key bag, the
// ECDSA signing key, and two certificate bags: the signing certificate
// (with the key) and the encryption certificate. The HPKE key is re-derived
// from the ECDSA key on import.
//
// Use a high-entropy password: PKCS#12 key derivation is weak against
// guessing.
func (g *Guardian) ExportPKCS12(password string) ([]byte, error) {
	if g.signer != nil && g.signKey == nil {
		return nil, fmt.Errorf("guardian: the private keys of %v are held outside this process (TPM or HSM) and cannot be exported; export its certificates with ExportCertificates", g)
	}
	if g.signKey == nil {
		return nil, fmt.Errorf("guardian: %v is public only (certificates, no private key); export it with ExportCertificates, or export from the host that holds it", g)
	}
	if password == "" {
		return nil, errors.New("guardian: empty PKCS#12 password; choose one, e.g. from `openssl rand -hex 16`")
	}
	pfx, err := pkcs12.Modern2023.WithRand(rand.Reader).Encode(g.signKey, g.signCert, []*x509.Certificate{g.encCert}, password)
	if err != nil {
		return nil, fmt.Errorf("guardian: encoding PKCS#12 for %v: %w", g, err)
	}
	return pfx, nil
}

// ImportPKCS12 decodes a guardian written by ExportPKCS12, checking that the
// private key matches both certificates. A wrong password yields an error
// wrapping ErrWrongPassword. Whether the guardian is already known is for
// the caller to decide by its Fingerprint.
func ImportPKCS12(data []byte, password string) (*Guardian, error) {
	if err := notPKCS12(data); err != nil {
		return nil, err
	}
	key, leaf, others, err := pkcs12.DecodeChain(data, password)
	if err != nil {
		if errors.Is(err, pkcs12.ErrIncorrectPassword) || errors.Is(err, pkcs12.ErrDecryption) {
			return nil, fmt.Errorf("%w: the password does not open this file; check it and try again", ErrWrongPassword)
		}
		return nil, fmt.Errorf("guardian: reading PKCS#12 (is it a file from ExportPKCS12 or openssl pkcs12 -export?): %w", err)
	}
	ek, ok := key.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("guardian: PKCS#12 private key is %T, want an ECDSA P-256 key", key)
	}
	signCert, encCert, err := splitCertificates(append([]*x509.Certificate{leaf}, others...))
	if err != nil {
		return nil, fmt.Errorf("%w (in PKCS#12)", err)
	}
	g, err := fromCertificates(signCert, encCert)
	if err != nil {
		return nil, err
	}
	return g.withPrivate(ek)
}

// NotPKCS12Error is returned by ImportPKCS12 for PEM text, which is what an
// export of a guardian's certificates (ExportCertificates) or openssl's
// printout of a PKCS#12 file looks like: a PKCS#12 file is binary DER.
type NotPKCS12Error struct {
	Certificates int  // CERTIFICATE blocks
	PrivateKey   bool // a PRIVATE KEY block is present
	// File names the input, for the remedies; callers that know it set it.
	File string
}

func (e *NotPKCS12Error) Error() string {
	if e.PrivateKey {
		return fmt.Sprintf("guardian: PEM text holding a private key and %d certificates, not a PKCS#12 file; convert it to PKCS#12 first", e.Certificates)
	}
	return fmt.Sprintf("guardian: PEM text holding %d certificates, not a PKCS#12 file: public certificates carry no private key, so this host cannot hold that guardian; trust the TPMs it owns, or grant it access to a TPM, instead", e.Certificates)
}

// Is makes the error match errdefs.ErrInvalidArgument.
func (e *NotPKCS12Error) Is(target error) bool { return target == errdefs.ErrInvalidArgument }

// Remedies says what to do with certificates, or how to make a PKCS#12
// file of a PEM private key.
func (e *NotPKCS12Error) Remedies() []errdefs.Remedy {
	file := e.File
	if file == "" {
		file = "CERTS.pem"
	}
	if e.PrivateKey {
		return []errdefs.Remedy{errdefs.Advise("convert it: openssl pkcs12 -export -in %s -out GUARDIAN.p12, then import GUARDIAN.p12", file)}
	}
	return []errdefs.Remedy{
		errdefs.Do(errdefs.ActionGuardianTrust, "certs", file).WithNote("to open TPMs this guardian owns and has granted this host"),
		errdefs.Do(errdefs.ActionProtectorGrant, "certs", file).WithNote("to let this guardian open a TPM this host owns"),
	}
}

// notPKCS12 recognises PEM input, which DecodeChain would report as an
// ASN.1 parse error. A PKCS#12 file is a DER SEQUENCE (first byte 0x30);
// PEM may follow other text, such as the "Bag Attributes" openssl prints.
func notPKCS12(data []byte) error {
	if len(data) == 0 || data[0] == 0x30 || !bytes.Contains(data, []byte("-----BEGIN ")) {
		return nil
	}
	e := &NotPKCS12Error{}
	for rest := data; ; {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			break
		}
		switch block.Type {
		case pemCertificate:
			e.Certificates++
		case pemPrivateKey, "EC PRIVATE KEY":
			e.PrivateKey = true
		}
	}
	return e
}
