package manufacture

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"time"

	"github.com/google/uuid"
)

// TCG object identifiers used in EK and platform certificates (TCG EK
// Credential Profile 2.0, TCG Platform Attribute Credential Profile).
var (
	oidTPMManufacturer       = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel              = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion            = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidTPMSpecification      = asn1.ObjectIdentifier{2, 23, 133, 2, 16}
	oidPlatformManufacturer  = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 1}
	oidPlatformModel         = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 4}
	oidPlatformVersion       = asn1.ObjectIdentifier{2, 23, 133, 5, 1, 5}
	oidEKCertificate         = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	oidPlatformCertificate   = asn1.ObjectIdentifier{2, 23, 133, 8, 2}
	oidSubjectAltName        = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidSubjectDirectoryAttrs = asn1.ObjectIdentifier{2, 5, 29, 9}
)

// Identity describes the TPM a certificate is issued for.
type Identity struct {
	TPM uuid.UUID // the vTPM's UUID, in every certificate
	VM  string    // optional VM name (swtpm_setup --vmid), the subject CN

	// TPM manufacturer, model and version, in the SAN of EK certificates.
	Manufacturer string // "id:XXXXXXXX"
	Model        string
	Version      string // "id:XXXXXXXX"

	// TPM specification (subject directory attributes of EK certificates).
	SpecFamily   string // "2.0"
	SpecLevel    int
	SpecRevision int

	// Platform manufacturer, model and version, in the platform certificate.
	PlatformManufacturer string
	PlatformModel        string
	PlatformVersion      string
}

// vtpm's identity in certificates. libtpms 0.9 reports its own fixed
// TPM_PT_MANUFACTURER ("IBM") and vendor strings ("SW TPM") and offers no way
// to change them, so vtpm identifies itself here instead: the manufacturer
// id is "VTPM" in ASCII, as TCG vendor ids are.
const (
	VTPMManufacturer = "id:5654504D"
	VTPMModel        = "vtpm"
)

// Default platform attributes for the platform certificate.
const (
	DefaultPlatformManufacturer = "vtpm"
	DefaultPlatformModel        = "QEMU"
	DefaultPlatformVersion      = "1.0"
)

// ekNotAfter is GeneralizedTime 99991231235959Z: "no well-defined expiration
// date" (RFC 5280 §4.1.2.5), as the TCG EK profile recommends for EKs.
var ekNotAfter = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)

type utf8ATV struct {
	Type  asn1.ObjectIdentifier
	Value string `asn1:"utf8"`
}

// directoryName encodes a Name with one attribute per RDN, values UTF8String.
func directoryName(attrs []utf8ATV) ([]byte, error) {
	var rdns []asn1.RawValue
	for _, a := range attrs {
		atv, err := asn1.Marshal(a)
		if err != nil {
			return nil, err
		}
		rdns = append(rdns, asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSet, IsCompound: true, Bytes: atv})
	}
	return asn1.Marshal(rdns)
}

// subjectAltName builds a SAN holding a directoryName with attrs and the
// URI urn:uuid:<TPM UUID>.
func subjectAltName(attrs []utf8ATV, id uuid.UUID) (pkix.Extension, error) {
	dn, err := directoryName(attrs)
	if err != nil {
		return pkix.Extension{}, err
	}
	names := []asn1.RawValue{
		{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: dn},
		{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(id.URN())},
	}
	v, err := asn1.Marshal(names)
	if err != nil {
		return pkix.Extension{}, err
	}
	return pkix.Extension{Id: oidSubjectAltName, Critical: true, Value: v}, nil
}

// tpmSpecification is the subject directory attributes extension holding
// the TCG TPMSpecification attribute.
func tpmSpecification(family string, level, revision int) (pkix.Extension, error) {
	spec, err := asn1.Marshal(struct {
		Family   string `asn1:"utf8"`
		Level    int
		Revision int
	}{family, level, revision})
	if err != nil {
		return pkix.Extension{}, err
	}
	v, err := asn1.Marshal([]struct {
		Type   asn1.ObjectIdentifier
		Values []asn1.RawValue `asn1:"set"`
	}{{oidTPMSpecification, []asn1.RawValue{{FullBytes: spec}}}})
	if err != nil {
		return pkix.Extension{}, err
	}
	return pkix.Extension{Id: oidSubjectDirectoryAttrs, Value: v}, nil
}

func subject(id Identity) pkix.Name {
	cn := id.VM
	if cn == "" {
		cn = "vTPM " + id.TPM.String()
	}
	return pkix.Name{CommonName: cn, SerialNumber: id.TPM.String()}
}

// keyUsageFor is keyEncipherment for RSA and keyAgreement for ECC keys.
func keyUsageFor(pub crypto.PublicKey) (x509.KeyUsage, error) {
	switch pub.(type) {
	case *rsa.PublicKey:
		return x509.KeyUsageKeyEncipherment, nil
	case *ecdsa.PublicKey:
		return x509.KeyUsageKeyAgreement, nil
	}
	return 0, fmt.Errorf("EK public key is a %T; want RSA or ECDSA", pub)
}

// EKCertificate issues a TCG EK certificate for the EK public key ek.
func (c *CA) EKCertificate(ek crypto.PublicKey, id Identity, now time.Time) ([]byte, error) {
	ku, err := keyUsageFor(ek)
	if err != nil {
		return nil, err
	}
	san, err := subjectAltName([]utf8ATV{
		{oidTPMManufacturer, id.Manufacturer},
		{oidTPMModel, id.Model},
		{oidTPMVersion, id.Version},
	}, id.TPM)
	if err != nil {
		return nil, fmt.Errorf("EK certificate SAN: %w", err)
	}
	spec, err := tpmSpecification(id.SpecFamily, id.SpecLevel, id.SpecRevision)
	if err != nil {
		return nil, fmt.Errorf("EK certificate TPM specification: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               subject(id),
		NotBefore:             now.Add(-time.Hour).UTC(),
		NotAfter:              ekNotAfter,
		KeyUsage:              ku,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{oidEKCertificate},
		BasicConstraintsValid: true,
		ExtraExtensions:       []pkix.Extension{san, spec},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Cert, ek, c.key)
	if err != nil {
		return nil, fmt.Errorf("sign EK certificate: %w", err)
	}
	return der, nil
}

// PlatformCertificate issues an X.509 platform certificate (attribute-free,
// as swtpm's) bound to the EK public key ek.
func (c *CA) PlatformCertificate(ek crypto.PublicKey, id Identity, now time.Time) ([]byte, error) {
	ku, err := keyUsageFor(ek)
	if err != nil {
		return nil, err
	}
	san, err := subjectAltName([]utf8ATV{
		{oidPlatformManufacturer, id.PlatformManufacturer},
		{oidPlatformModel, id.PlatformModel},
		{oidPlatformVersion, id.PlatformVersion},
	}, id.TPM)
	if err != nil {
		return nil, fmt.Errorf("platform certificate SAN: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               subject(id),
		NotBefore:             now.Add(-time.Hour).UTC(),
		NotAfter:              ekNotAfter,
		KeyUsage:              ku,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{oidPlatformCertificate},
		BasicConstraintsValid: true,
		ExtraExtensions:       []pkix.Extension{san},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Cert, ek, c.key)
	if err != nil {
		return nil, fmt.Errorf("sign platform certificate: %w", err)
	}
	return der, nil
}

// CertUUID returns the TPM UUID a vtpm certificate carries (the SAN URI
// urn:uuid:…), or uuid.Nil.
func CertUUID(cert *x509.Certificate) uuid.UUID {
	for _, u := range cert.URIs {
		if id, err := uuid.Parse(u.String()); err == nil && u.Scheme == "urn" {
			return id
		}
	}
	return uuid.Nil
}
