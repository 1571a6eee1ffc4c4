package manufacture

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/uuid"

	"vtpm/internal/keybroker"
	"vtpm/internal/state"
)

// CertSummary is a certificate in NV, for display and JSON.
type CertSummary struct {
	Index     string    `json:"nv_index"`
	Subject   string    `json:"subject"`
	Issuer    string    `json:"issuer"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	TPM       string    `json:"tpm_uuid,omitempty"`
	Locked    bool      `json:"write_locked"`
	PEM       string    `json:"pem"`
}

// EKSummary is an endorsement key, for display and JSON.
type EKSummary struct {
	Name        string       `json:"name"`
	Handle      string       `json:"handle"`
	Fingerprint string       `json:"public_key_sha256"`
	PublicKey   string       `json:"public_key_pem"`
	Certificate *CertSummary `json:"certificate,omitempty"`
}

// ProtectorRow is a guardian a TPM's key protector admits.
type ProtectorRow struct {
	Name        string `json:"name"`
	Fingerprint string `json:"fingerprint"`
	Owner       bool   `json:"owner"`
}

// Summary is a TPM read back from its state directory. (JSON fields are in
// the order of their names.)
type Summary struct {
	Dir    string       `json:"dir"`
	EKs    []EKSummary  `json:"eks"`
	Format state.Format `json:"format"`
	// Generation is the sealed state's; nil for swtpm files or when it
	// cannot be read.
	Generation   *uint64        `json:"generation,omitempty"`
	PCRBanks     []string       `json:"pcr_banks"`
	Available    []string       `json:"pcr_banks_available"`
	PlatformCert *CertSummary   `json:"platform_certificate,omitempty"`
	Protector    []ProtectorRow `json:"protector,omitempty"` // nil without a readable protector
	TPM          string         `json:"tpm,omitempty"`       // the sealed state's UUID
}

// Made is what Run or Make manufactured, for display and JSON.
type Made struct {
	EKs          []EKSummary  `json:"eks"`
	Format       state.Format `json:"format"`
	PCRBanks     []string     `json:"pcr_banks"`
	PlatformCert bool         `json:"platform_certificate"`
	TPM          string       `json:"tpm"`
}

// Summary is r for display and JSON.
func (r *Result) Summary() Made {
	var eks []EKSummary
	for _, ek := range r.Report.EKs {
		e := ekSummary(ek.Name, ek.Handle, ek.Public)
		if ek.Cert != nil {
			c, _ := x509.ParseCertificate(ek.Cert)
			e.Certificate = certSummary(c, uint32(ek.CertIndex), false)
		}
		eks = append(eks, e)
	}
	return Made{EKs: eks, Format: r.Format, PCRBanks: r.Report.PCRBanks, PlatformCert: r.Report.PlatformCert != nil, TPM: r.TPM.String()}
}

// summarize describes the TPM in dir, whose state was opened as st and
// inspected as info.
func summarize(dir string, st *state.Opened, info *Info) *Summary {
	out := &Summary{Dir: dir, Format: st.Format, PCRBanks: info.PCRBanks, Available: info.Available}
	if st.Store != nil {
		out.TPM = st.TPM.String()
		if g, err := st.Store.Generation("permall"); err == nil {
			out.Generation = &g
		}
	}
	for _, ek := range info.EKs {
		e := ekSummary(ek.Name, ek.Handle, ek.Public)
		e.Certificate = certSummary(ek.Cert, uint32(ek.CertIndex), ek.Locked)
		out.EKs = append(out.EKs, e)
	}
	out.PlatformCert = certSummary(info.PlatformCert, uint32(IndexPlatform), false)
	if p, err := keybroker.ReadProtector(dir); err == nil {
		for _, r := range p.Rows() {
			out.Protector = append(out.Protector, ProtectorRow{r.Name, r.Fingerprint, r.Fingerprint == p.Owner().Fingerprint()})
		}
	}
	return out
}

func ekSummary(name string, handle tpm2.TPMHandle, pub crypto.PublicKey) EKSummary {
	e := EKSummary{Name: name, Handle: fmt.Sprintf("%#x", uint32(handle))}
	if der, err := x509.MarshalPKIXPublicKey(pub); err == nil {
		sum := sha256.Sum256(der)
		e.Fingerprint, e.PublicKey = hex.EncodeToString(sum[:]), string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	}
	return e
}

func certSummary(c *x509.Certificate, index uint32, locked bool) *CertSummary {
	if c == nil {
		return nil
	}
	s := &CertSummary{
		Index: fmt.Sprintf("%#x", index), Subject: c.Subject.String(), Issuer: c.Issuer.String(),
		Serial: c.SerialNumber.Text(16), NotBefore: c.NotBefore, NotAfter: c.NotAfter, Locked: locked,
		PEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})),
	}
	if id := CertUUID(c); id != uuid.Nil {
		s.TPM = id.String()
	}
	return s
}
