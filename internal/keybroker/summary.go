package keybroker

import (
	"fmt"
	"io"

	"github.com/google/uuid"

	"vtpm/internal/guardian"
)

// GuardianSummary is a guardian as lists show it.
type GuardianSummary struct {
	Name        string `json:"name"`
	Fingerprint string `json:"fingerprint"`
	Subject     string `json:"subject"`
	KEM         string `json:"kem"`
	Local       bool   `json:"local"` // this host's own guardian
	// TrustedOnly marks a guardian this host does not hold but trusts as
	// the owner of key protectors (see [Broker.Trust]).
	TrustedOnly bool `json:"trusted_only,omitempty"`
}

// Line is s as a line of a guardian list: the start of its fingerprint,
// its KEM, its name and whether it is this host's or only trusted.
func (s GuardianSummary) Line() string {
	mark := ""
	if s.Local {
		mark += "  (this host)"
	}
	if s.TrustedOnly {
		mark += "  (trusted only: owns TPMs that open here, not held)"
	}
	return fmt.Sprintf("%s  %s  %s%s", s.Fingerprint[:16], s.KEM, s.Name, mark)
}

// Summarize returns g as lists show it; local says whether it is this
// host's own.
func Summarize(g *guardian.Guardian, local bool) GuardianSummary {
	return GuardianSummary{Name: g.Name(), Fingerprint: g.Fingerprint(), Subject: g.Subject(), KEM: fmt.Sprint(g.KEM()), Local: local}
}

// GuardianSummaries lists the guardians this host holds, its own first,
// then those it only trusts (TrustedOnly).
func (h *Broker) GuardianSummaries() ([]GuardianSummary, error) {
	gs, err := h.Guardians()
	if err != nil {
		return nil, err
	}
	var out []GuardianSummary
	for i, g := range gs {
		out = append(out, Summarize(g, i == 0))
	}
	trusted, err := h.Trusted()
	if err != nil {
		return nil, err
	}
	for _, g := range trusted {
		s := Summarize(g, false)
		s.TrustedOnly = true
		out = append(out, s)
	}
	return out, nil
}

// ProtectorSummary is a TPM's key protector as shown to people: who owns it
// and which guardians it admits. (JSON fields are in the order of their
// names; rows keep their Go field names.)
type ProtectorSummary struct {
	Owner     string         `json:"owner"` // the owner's fingerprint
	OwnerName string         `json:"-"`
	Rows      []ProtectorRow `json:"rows"`
	TPM       uuid.UUID      `json:"tpm"`
	Version   uint64         `json:"version"` // the protector's, raised by every change
}

// ProtectorRow is a guardian a protector admits.
type ProtectorRow struct {
	Name, Fingerprint, Subject string
	Owner                      bool
}

// SummarizeProtector returns p as shown to people.
func SummarizeProtector(p *guardian.Protector) ProtectorSummary {
	s := ProtectorSummary{Owner: p.Owner().Fingerprint(), OwnerName: p.Owner().Name(), TPM: p.TPM(), Version: p.Version()}
	for _, r := range p.Rows() {
		s.Rows = append(s.Rows, ProtectorRow{r.Name, r.Fingerprint, r.Subject, r.Fingerprint == s.Owner})
	}
	return s
}

// WriteText writes s as text: the TPM and its owner, then one line a
// guardian admitted.
func (s ProtectorSummary) WriteText(w io.Writer) {
	fmt.Fprintf(w, "TPM %s, owner %s (%s), protector version %d\n", s.TPM, s.OwnerName, s.Owner, s.Version)
	for _, r := range s.Rows {
		owner := ""
		if r.Owner {
			owner = "  (owner)"
		}
		fmt.Fprintf(w, "  %s  %s%s\n", r.Fingerprint, r.Name, owner)
	}
}
