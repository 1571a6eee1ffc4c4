package manufacture

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// WriteText writes r, the TPM just made in dir, as text: its EKs, where
// their certificates are, the platform certificate and the PCR banks.
func (r *Result) WriteText(w io.Writer, dir string) {
	fmt.Fprintf(w, "manufactured TPM %s in %s (%s state)\n", r.TPM, dir, r.Format)
	for _, ek := range r.Report.EKs {
		cert := "no certificate"
		if ek.Cert != nil {
			cert = fmt.Sprintf("certificate in NV %#x", uint32(ek.CertIndex))
		}
		fmt.Fprintf(w, "  EK %-10s %#x  %s\n", ek.Name, uint32(ek.Handle), cert)
	}
	if r.Report.PlatformCert != nil {
		fmt.Fprintf(w, "  platform certificate in NV %#x\n", uint32(IndexPlatform))
	}
	fmt.Fprintf(w, "  PCR banks: %s\n", strings.Join(r.Report.PCRBanks, ","))
}

// WriteText writes s as text, one fact a line; an unknown generation is
// written as <nil>.
func (s *Summary) WriteText(w io.Writer) {
	if s.TPM != "" {
		var gen any
		if s.Generation != nil {
			gen = *s.Generation
		}
		fmt.Fprintf(w, "TPM %s in %s (%s state, generation %v)\n", s.TPM, s.Dir, s.Format, gen)
	} else {
		fmt.Fprintf(w, "TPM in %s (%s state)\n", s.Dir, s.Format)
	}
	for _, ek := range s.EKs {
		fmt.Fprintf(w, "EK %s at %s, public key sha256 %s\n", ek.Name, ek.Handle, ek.Fingerprint)
		ek.Certificate.writeText(w)
	}
	if s.PlatformCert != nil {
		fmt.Fprintln(w, "platform certificate:")
		s.PlatformCert.writeText(w)
	}
	fmt.Fprintf(w, "PCR banks: %s (of %s)\n", strings.Join(s.PCRBanks, ","), strings.Join(s.Available, ","))
	for _, r := range s.Protector {
		owner := ""
		if r.Owner {
			owner = "  (owner)"
		}
		fmt.Fprintf(w, "protector: %s  %s%s\n", r.Fingerprint, r.Name, owner)
	}
}

func (c *CertSummary) writeText(w io.Writer) {
	if c == nil {
		fmt.Fprintln(w, "  no certificate")
		return
	}
	lock := ""
	if c.Locked {
		lock = ", write-locked"
	}
	fmt.Fprintf(w, "  certificate in NV %s%s\n    subject: %s\n    issuer:  %s\n    valid:   %s to %s\n",
		c.Index, lock, c.Subject, c.Issuer, c.NotBefore.Format(time.DateOnly), c.NotAfter.Format(time.DateOnly))
}
