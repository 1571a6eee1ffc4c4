package tpmmode_test

import (
	"context"
	"errors"
	"testing"

	"vtpm/internal/attest"
	"vtpm/internal/attest/attesttest"
	"vtpm/internal/attest/tpmmode"
	"vtpm/internal/errdefs"
	"vtpm/internal/keyservice/verify"
)

// policies is a policy store held in memory.
type policies map[string]*verify.Policy

func (p policies) Policy(_ context.Context, name string) (*verify.Policy, error) {
	if v, ok := p[name]; ok {
		return v, nil
	}
	return nil, errdefs.New(errdefs.ErrNotFound, "no attestation policy %q", name)
}

// TestVerifier runs the verifier's two steps as the service does, with the
// prover's answers, and checks the verdict or the failure's reason.
func TestVerifier(t *testing.T) {
	ctx := context.Background()
	ref := attesttest.Start(t, attesttest.Reference)
	p, err := attest.CaptureHost(attest.HostOptions{TPM: ref.Spec, EventLog: ref.EventLog}, "fleet-boot", "x86-ovmf")
	if err != nil {
		t.Fatal(err)
	}
	// Through the service's form and back, unchanged.
	vp := tpmmode.ToVerify(p)
	if back := tpmmode.ToVerify(tpmmode.FromVerify(vp)); len(back.Classes) != 1 || back.Name != "fleet-boot" || !back.RequireSecureBoot {
		t.Fatalf("policy after a round trip: %+v", back)
	}
	ps := policies{"fleet-boot": vp}
	// A policy that accepts the values of a boot with Secure Boot off, but
	// requires Secure Boot.
	off := verify.PCRClass{Name: "x86-ovmf", PCRs: map[uint32][]byte{}}
	for i, d := range attesttest.SecureBootOff.PCRs() {
		off.PCRs[uint32(i)] = d
	}
	ps["sb-required"] = &verify.Policy{Name: "sb-required", RequireSecureBoot: true, Classes: []verify.PCRClass{off}}

	for _, tc := range []struct {
		name   string
		boot   attesttest.Boot
		policy string
		mode   string
		reason verify.Reason
		pcr    int
	}{
		{"reference boot", attesttest.Reference, "fleet-boot", verify.ModeTPM, "", -1},
		{"other db", attesttest.OtherDB, "fleet-boot", verify.ModeTPM, verify.ReasonPCRMismatch, 7},
		{"Secure Boot off", attesttest.SecureBootOff, "fleet-boot", verify.ModeTPM, verify.ReasonPCRMismatch, 7},
		{"Secure Boot off, values accepted", attesttest.SecureBootOff, "sb-required", verify.ModeTPM, verify.ReasonSecureBootOff, -1},
		{"no such policy", attesttest.Reference, "gone", verify.ModeTPM, verify.ReasonNoPolicy, -1},
		{"key mode asked", attesttest.Reference, "fleet-boot", verify.ModeKey, verify.ReasonMode, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tpm := attesttest.Start(t, tc.boot)
			h := &verify.Host{Name: "h", Mode: verify.ModeTPM, EK: ekPEM(t, tpm), Policy: tc.policy}
			prover := tpmmode.Prover{Options: attest.HostOptions{TPM: tpm.Spec, EventLog: tpm.EventLog}}
			var v tpmmode.Verifier
			verdict, err := func() (*verify.Verdict, error) {
				b, err := prover.Begin(ctx)
				if err != nil {
					t.Fatal(err)
				}
				b.Mode = tc.mode
				c, err := v.Challenge(ctx, h, b)
				if err != nil {
					return nil, err
				}
				// What the host receives: no secret, no state.
				ev, err := prover.Answer(ctx, &verify.Challenge{Nonce: c.Nonce, Credential: c.Credential, EncryptedSecret: c.EncryptedSecret})
				if err != nil {
					t.Fatal(err)
				}
				return v.Verify(ctx, h, c, ev, ps)
			}()
			if tc.reason == "" {
				if err != nil {
					t.Fatal(err)
				}
				if verdict.Policy != "fleet-boot" || verdict.Class != "x86-ovmf" {
					t.Fatalf("verdict %+v", verdict)
				}
				return
			}
			var f *verify.Failure
			if !errors.As(err, &f) {
				t.Fatalf("got %v, want a failure (%s)", err, tc.reason)
			}
			if f.Reason != tc.reason || f.PCR != tc.pcr || f.Host != "h" {
				t.Fatalf("failure %s PCR %d host %q (%v), want %s PCR %d", f.Reason, f.PCR, f.Host, err, tc.reason, tc.pcr)
			}
		})
	}
}
