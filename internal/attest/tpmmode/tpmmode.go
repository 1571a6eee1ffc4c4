// Package tpmmode plugs TPM-mode attestation (package attest) into the key
// service's attestation contract (package verify): the service's Verifier
// for hosts registered in TPM mode, and the host's side of the exchange.
package tpmmode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/attest"
	"vtpm/internal/errdefs"
	"vtpm/internal/keyservice/verify"
)

// Verifier attests hosts registered in TPM mode. The zero value is ready:
// challenges live attest.DefaultChallengeTTL, time is time.Now.
type Verifier struct {
	TTL time.Duration
	Now func() time.Time
}

var _ verify.Verifier = Verifier{}

// Mode returns verify.ModeTPM.
func (Verifier) Mode() string { return verify.ModeTPM }

func (v Verifier) now() time.Time {
	if v.Now != nil {
		return v.Now()
	}
	return time.Now()
}

// Challenge checks the host's EK against the one registered and its AK,
// and makes a credential for the AK that only the registered TPM can
// activate, with a fresh nonce.
func (v Verifier) Challenge(_ context.Context, h *verify.Host, b *verify.Begin) (*verify.Challenge, error) {
	if b.Mode != verify.ModeTPM {
		return nil, verify.Fail(h, verify.ReasonMode, "host is registered for %s mode, attested in %s mode", verify.ModeTPM, b.Mode)
	}
	registered, err := attest.ParseEK(h.EK)
	if err != nil {
		return nil, fmt.Errorf("host %s: registered endorsement key: %w", h.Name, err)
	}
	s, c, err := attest.NewSession(registered, b.EKPublic, b.AKPublic, v.now(), v.TTL, nil)
	if err != nil {
		return nil, failure(h, err)
	}
	secret := s.Secret
	s.Secret, s.Nonce = nil, nil // in the challenge already
	state, err := json.Marshal(s)
	if err != nil {
		return nil, err
	}
	return &verify.Challenge{
		Nonce:           c.Nonce,
		Credential:      c.CredentialBlob,
		EncryptedSecret: c.EncryptedSecret,
		Secret:          secret,
		State:           state,
	}, nil
}

// Verify checks the evidence against the challenge and the host's policy.
func (v Verifier) Verify(ctx context.Context, h *verify.Host, c *verify.Challenge, e *verify.Evidence, ps verify.Policies) (*verify.Verdict, error) {
	var s attest.Session
	if err := json.Unmarshal(c.State, &s); err != nil {
		return nil, fmt.Errorf("host %s: attestation session: %w", h.Name, err)
	}
	s.Secret, s.Nonce = c.Secret, c.Nonce
	if e.PCRBank != 0 && e.PCRBank != uint16(tpm2.TPMAlgSHA256) {
		return nil, verify.Fail(h, verify.ReasonBadQuote, "PCR bank %#x, want SHA-256", e.PCRBank)
	}
	ev := &attest.Evidence{
		Secret:    e.ActivatedSecret,
		Quote:     e.Quote,
		Signature: e.QuoteSignature,
		PCRs:      make([][]byte, len(attest.PCRs)),
		EventLog:  e.EventLog,
	}
	for i, p := range attest.PCRs {
		ev.PCRs[i] = e.PCRs[uint32(p)]
	}
	r, err := s.Verify(ev, v.now())
	if err != nil {
		return nil, failure(h, err)
	}
	if h.Policy == "" {
		return nil, verify.Fail(h, verify.ReasonNoPolicy, "the host was registered without an attestation policy")
	}
	vp, err := ps.Policy(ctx, h.Policy)
	if errors.Is(err, errdefs.ErrNotFound) || (err == nil && vp == nil) {
		return nil, verify.Fail(h, verify.ReasonNoPolicy, "policy %s does not exist", h.Policy)
	}
	if err != nil {
		return nil, err
	}
	class, err := FromVerify(vp).Match("", r)
	if err != nil {
		return nil, failure(h, err)
	}
	return &verify.Verdict{Policy: vp.Name, Class: class}, nil
}

// failure turns attest's refusals into the service's.
func failure(h *verify.Host, err error) error {
	var pe *attest.PolicyError
	if errors.As(err, &pe) {
		// Failure's message names the first PCR and the policy; the detail
		// adds the rest of the facts.
		f := verify.Fail(h, verify.ReasonPCRMismatch, "%s", pe.Error())
		f.Policy = pe.Policy
		switch {
		case len(pe.Mismatches) > 0:
			f.PCR = pe.Mismatches[0].PCR
			f.Detail = "hardware class " + pe.Class
			for _, m := range pe.Mismatches[1:] {
				f.Detail += fmt.Sprintf("; PCR %d differs too", m.PCR)
			}
			if pe.SecureBootOff {
				f.Detail += "; Secure Boot is off"
			}
		case pe.SecureBootOff:
			f.Reason, f.Detail = verify.ReasonSecureBootOff, "the host booted with Secure Boot off"
		}
		return f
	}
	var ee *attest.EvidenceError
	if !errors.As(err, &ee) {
		return err
	}
	reason := verify.ReasonBadQuote
	switch ee.Reason {
	case attest.ReasonEKNotRegistered, attest.ReasonBadEK:
		reason = verify.ReasonWrongEK
	case attest.ReasonActivation, attest.ReasonBadAK:
		reason = verify.ReasonActivation
	case attest.ReasonExpired:
		reason = verify.ReasonSessionExpired
	case attest.ReasonEventLog, attest.ReasonReplay:
		reason = verify.ReasonEventLog
	}
	f := verify.Fail(h, reason, "%s", ee.Error())
	if len(ee.PCRs) > 0 && reason == verify.ReasonEventLog {
		f.PCR = ee.PCRs[0]
	}
	return f
}

// FromVerify converts the service's policy to attest's.
func FromVerify(vp *verify.Policy) *attest.Policy {
	p := &attest.Policy{Name: vp.Name, SecureBoot: vp.RequireSecureBoot, Classes: map[string][]attest.PCRValues{}}
	for _, c := range vp.Classes {
		v := attest.PCRValues{}
		for i, d := range c.PCRs {
			v[int(i)] = d
		}
		p.Classes[c.Name] = append(p.Classes[c.Name], v)
	}
	return p
}

// ToVerify converts attest's policy to the service's (one PCRClass per
// accepted boot, the class's name repeated).
func ToVerify(p *attest.Policy) *verify.Policy {
	vp := &verify.Policy{Name: p.Name, RequireSecureBoot: p.SecureBoot}
	for _, name := range sortedKeys(p.Classes) {
		for _, v := range p.Classes[name] {
			c := verify.PCRClass{Name: name, PCRs: map[uint32][]byte{}}
			for i, d := range v {
				c.PCRs[uint32(i)] = d
			}
			vp.Classes = append(vp.Classes, c)
		}
	}
	return vp
}

// Prover is a host's side of TPM-mode attestation (client.Prover). It
// opens the host TPM for each step and keeps nothing between them: the EK
// and the AK are primary keys, made again identical from the TPM's
// endorsement seed, so the AK that answers is the one the service named.
type Prover struct {
	Options attest.HostOptions
}

// Begin sends the EK and AK public areas.
func (p Prover) Begin(context.Context) (*verify.Begin, error) {
	h, err := attest.OpenHost(p.Options)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return &verify.Begin{Mode: verify.ModeTPM, EKPublic: h.EKPublic(), AKPublic: h.AKPublic()}, nil
}

// Answer activates the credential with the host TPM and quotes PCRs 0–7
// over the nonce, with their values and the event log.
func (p Prover) Answer(_ context.Context, c *verify.Challenge) (*verify.Evidence, error) {
	h, err := attest.OpenHost(p.Options)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	ev, err := h.Answer(attest.Challenge{CredentialBlob: c.Credential, EncryptedSecret: c.EncryptedSecret, Nonce: c.Nonce})
	if err != nil {
		return nil, err
	}
	out := &verify.Evidence{
		ActivatedSecret: ev.Secret,
		Quote:           ev.Quote,
		QuoteSignature:  ev.Signature,
		PCRs:            make(map[uint32][]byte, len(ev.PCRs)),
		PCRBank:         uint16(tpm2.TPMAlgSHA256),
		EventLog:        ev.EventLog,
	}
	for i, idx := range attest.PCRs {
		out.PCRs[uint32(idx)] = ev.PCRs[i]
	}
	return out, nil
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
