package attest

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/attest/attesttest"
)

// TestQuoteSelection: a quote over other PCRs than exactly 0–7 of the
// SHA-256 bank is refused, even with a valid signature and nonce.
func TestQuoteSelection(t *testing.T) {
	tpm := attesttest.Start(t, attesttest.Reference)
	h, err := OpenHost(HostOptions{TPM: tpm.Spec, EventLog: tpm.EventLog})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ek, err := h.EK()
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for _, tc := range []struct {
		name string
		sel  []tpm2.TPMSPCRSelection
	}{
		{"PCRs 0-6", []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: pcrSelect([]int{0, 1, 2, 3, 4, 5, 6})}}},
		{"PCRs 0-8", []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: pcrSelect([]int{0, 1, 2, 3, 4, 5, 6, 7, 8})}}},
		{"SHA-1 bank", []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA1, PCRSelect: pcrSelect(PCRs)}}},
		{"two banks", []tpm2.TPMSPCRSelection{
			{Hash: tpm2.TPMAlgSHA256, PCRSelect: pcrSelect(PCRs)},
			{Hash: tpm2.TPMAlgSHA1, PCRSelect: pcrSelect(PCRs)},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, c, err := NewSession(ek, h.EKPublic(), h.AKPublic(), now, 0, nil)
			if err != nil {
				t.Fatal(err)
			}
			ev, err := h.Answer(*c)
			if err != nil {
				t.Fatal(err)
			}
			q, err := tpm2.Quote{
				SignHandle:     tpm2.AuthHandle{Handle: h.ak.handle, Name: h.ak.name, Auth: tpm2.PasswordAuth(nil)},
				QualifyingData: tpm2.TPM2BData{Buffer: c.Nonce},
				InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
				PCRSelect:      tpm2.TPMLPCRSelection{PCRSelections: tc.sel},
			}.Execute(h.tpm)
			if err != nil {
				t.Fatal(err)
			}
			ev.Quote, ev.Signature = q.Quoted.Bytes(), tpm2.Marshal(q.Signature)
			_, err = s.Verify(ev, now)
			var ee *EvidenceError
			if !errors.As(err, &ee) || ee.Reason != ReasonSelection {
				t.Fatalf("got %v, want a refused selection", err)
			}
		})
	}
}
