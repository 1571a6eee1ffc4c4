package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// ParseEK parses a registered endorsement key: a PEM public key or
// certificate, a DER certificate or SubjectPublicKeyInfo, or a TPMT_PUBLIC
// or TPM2B_PUBLIC as the host sends it. Only RSA 2048 and ECC P-256 keys (the TCG EK
// templates' low range) are accepted.
func ParseEK(data []byte) (crypto.PublicKey, error) {
	if blk, _ := pem.Decode(data); blk != nil {
		data = blk.Bytes
	}
	var pub crypto.PublicKey
	if c, err := x509.ParseCertificate(data); err == nil {
		pub = c.PublicKey
	} else if k, err := x509.ParsePKIXPublicKey(data); err == nil {
		pub = k
	} else if p, err := unmarshalPublic(data); err == nil {
		if pub, err = tpm2.Pub(*p); err != nil {
			return nil, newEvidenceError(ReasonBadEK, err, "")
		}
	} else {
		return nil, newEvidenceError(ReasonBadEK, nil, "neither a certificate, a public key nor a TPM public area")
	}
	if _, err := ekTemplate(pub); err != nil {
		return nil, err
	}
	return pub, nil
}

// MarshalEK encodes an endorsement key as a PEM public key.
func MarshalEK(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("encode endorsement key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// EKFingerprint is the hex SHA-256 of an endorsement key's
// SubjectPublicKeyInfo, the name a host's TPM is known by.
func EKFingerprint(pub crypto.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// sameKey reports whether a and b are the same public key.
func sameKey(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

// ekTemplate returns the TCG EK template (low range) for pub, filled with
// its key: the public area a TPM holding pub's private key creates, so the
// credential can be encrypted to it without trusting the host's copy.
func ekTemplate(pub crypto.PublicKey) (tpm2.TPMTPublic, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() != 2048 || k.E != 65537 {
			return tpm2.TPMTPublic{}, newEvidenceError(ReasonBadEK, nil, "an RSA endorsement key must be 2048 bits with exponent 65537")
		}
		t := tpm2.RSAEKTemplate
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.FillBytes(make([]byte, 256))})
		return t, nil
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return tpm2.TPMTPublic{}, newEvidenceError(ReasonBadEK, nil, "an ECC endorsement key must be on P-256")
		}
		e, err := k.ECDH()
		if err != nil {
			return tpm2.TPMTPublic{}, newEvidenceError(ReasonBadEK, err, "")
		}
		pt := e.Bytes() // 0x04 || X || Y
		t := tpm2.ECCEKTemplate
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(pt[1:33])},
			Y: tpm2.TPM2BECCParameter{Buffer: bytes.Clone(pt[33:])},
		})
		return t, nil
	}
	return tpm2.TPMTPublic{}, newEvidenceError(ReasonBadEK, nil, "unsupported key type %T", pub)
}

// akTemplate is the attestation key: ECDSA P-256 with SHA-256, restricted
// to signing TPM-made structures (quotes), never leaving the TPM. It is a
// primary key of the endorsement hierarchy, so it needs no storage key and
// leaves nothing persistent in the host's TPM.
var akTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		Restricted:          true,
		SignEncrypt:         true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
		CurveID: tpm2.TPMECCNistP256,
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
		Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
	}),
}

// unmarshalPublic parses a public area given as TPMT_PUBLIC or as
// TPM2B_PUBLIC (the same, with a big-endian size in front; a TPMT_PUBLIC
// starts with its type, never with its own length).
func unmarshalPublic(b []byte) (*tpm2.TPMTPublic, error) {
	if len(b) > 2 && int(binary.BigEndian.Uint16(b)) == len(b)-2 {
		b = b[2:]
	}
	return tpm2.Unmarshal[tpm2.TPMTPublic](b)
}

// CheckAK parses an AK's TPMT_PUBLIC (or TPM2B_PUBLIC) and checks that it can only sign
// TPM-made structures and never leaves its TPM. It returns the public area
// and its name.
func CheckAK(public []byte) (*tpm2.TPMTPublic, []byte, error) {
	p, err := unmarshalPublic(public)
	if err != nil {
		return nil, nil, newEvidenceError(ReasonBadAK, err, "")
	}
	a := p.ObjectAttributes
	switch {
	case !a.FixedTPM || !a.FixedParent:
		return nil, nil, newEvidenceError(ReasonBadAK, nil, "the key can leave its TPM (fixedTPM and fixedParent are required)")
	case !a.SensitiveDataOrigin:
		return nil, nil, newEvidenceError(ReasonBadAK, nil, "the key was not generated by the TPM")
	case !a.Restricted || !a.SignEncrypt || a.Decrypt:
		return nil, nil, newEvidenceError(ReasonBadAK, nil, "the key is not a restricted signing key")
	case p.NameAlg != tpm2.TPMAlgSHA256:
		return nil, nil, newEvidenceError(ReasonBadAK, nil, "the key's name algorithm is not SHA-256")
	}
	if _, err := tpm2.Pub(*p); err != nil {
		return nil, nil, newEvidenceError(ReasonBadAK, err, "")
	}
	name, err := tpm2.ObjectName(p)
	if err != nil {
		return nil, nil, newEvidenceError(ReasonBadAK, err, "")
	}
	return p, name.Buffer, nil
}
