package keybroker

import (
	"fmt"

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
