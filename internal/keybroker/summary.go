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
}

// Summarize returns g as lists show it; local says whether it is this
// host's own.
func Summarize(g *guardian.Guardian, local bool) GuardianSummary {
	return GuardianSummary{g.Name(), g.Fingerprint(), g.Subject(), fmt.Sprint(g.KEM()), local}
}

// GuardianSummaries lists the guardians this host holds, its own first.
func (h *Broker) GuardianSummaries() ([]GuardianSummary, error) {
	gs, err := h.Guardians()
	if err != nil {
		return nil, err
	}
	var out []GuardianSummary
	for i, g := range gs {
		out = append(out, Summarize(g, i == 0))
	}
	return out, nil
}
