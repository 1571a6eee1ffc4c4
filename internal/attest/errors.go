package attest

import (
	"fmt"
	"strconv"
	"strings"

	"vtpm/internal/errdefs"
)

// Reason says why evidence was refused.
type Reason string

// Reasons for an [EvidenceError].
const (
	// ReasonEKNotRegistered: the host presented an EK other than the one
	// registered for it.
	ReasonEKNotRegistered Reason = "ek-not-registered"
	// ReasonBadEK: the EK cannot be parsed or is not an RSA 2048 or ECC
	// P-256 key.
	ReasonBadEK Reason = "bad-ek"
	// ReasonBadAK: the AK is not a restricted, fixedTPM, TPM-generated
	// signing key.
	ReasonBadAK Reason = "bad-ak"
	// ReasonActivation: the host did not return the credential's secret,
	// so its AK is not proven to live in the registered TPM.
	ReasonActivation Reason = "activation"
	// ReasonExpired: the challenge was answered after it expired.
	ReasonExpired Reason = "challenge-expired"
	// ReasonNonce: the quote was not made over this challenge's nonce (an
	// old or replayed quote).
	ReasonNonce Reason = "nonce"
	// ReasonSelection: the quote is not over exactly PCRs 0–7 of the
	// SHA-256 bank.
	ReasonSelection Reason = "pcr-selection"
	// ReasonQuote: the quote is malformed, its signature does not verify
	// with the AK, or it does not match the PCR values sent.
	ReasonQuote Reason = "quote"
	// ReasonEventLog: the event log cannot be parsed, or its Secure Boot
	// events are inconsistent.
	ReasonEventLog Reason = "event-log"
	// ReasonReplay: the event log does not replay to the quoted PCR values
	// (PCRs names them).
	ReasonReplay Reason = "event-log-replay"
)

// EvidenceError is attestation evidence that does not prove what it claims.
type EvidenceError struct {
	Reason Reason
	PCRs   []int  // the PCRs concerned, when the reason is about PCRs
	Detail string // what exactly, for the log
	Err    error  // the cause, or nil
}

func (e *EvidenceError) Error() string {
	var b strings.Builder
	switch e.Reason {
	case ReasonEKNotRegistered:
		b.WriteString("the host's TPM is not the one registered for it (its endorsement key differs)")
	case ReasonBadEK:
		b.WriteString("the endorsement key is not usable")
	case ReasonBadAK:
		b.WriteString("the attestation key is not a restricted signing key of the TPM")
	case ReasonActivation:
		b.WriteString("credential activation failed: the attestation key is not proven to be in the registered TPM")
	case ReasonExpired:
		b.WriteString("the attestation challenge expired before it was answered")
	case ReasonNonce:
		b.WriteString("the quote is not over this challenge's nonce (stale or replayed)")
	case ReasonSelection:
		b.WriteString("the quote is not over exactly PCRs 0-7 of the SHA-256 bank")
	case ReasonQuote:
		b.WriteString("the quote does not verify")
	case ReasonEventLog:
		b.WriteString("the measured-boot event log is not usable")
	case ReasonReplay:
		fmt.Fprintf(&b, "the measured-boot event log does not replay to the quoted %s", pcrList(e.PCRs))
	default:
		fmt.Fprintf(&b, "attestation refused (%s)", e.Reason)
	}
	if e.Detail != "" {
		b.WriteString(": ")
		b.WriteString(e.Detail)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the kind and the cause.
func (e *EvidenceError) Unwrap() []error {
	kind := errdefs.ErrPermissionDenied
	if e.Reason == ReasonBadEK {
		kind = errdefs.ErrInvalidArgument
	}
	if e.Err == nil {
		return []error{kind}
	}
	return []error{kind, e.Err}
}

// Remedies returns the ways out.
func (e *EvidenceError) Remedies() []errdefs.Remedy {
	switch e.Reason {
	case ReasonEKNotRegistered, ReasonActivation:
		return []errdefs.Remedy{errdefs.Advise("register the host again with the endorsement key of the TPM it has now, if its TPM was replaced or cleared")}
	case ReasonExpired, ReasonNonce:
		return []errdefs.Remedy{errdefs.Advise("attest again: each challenge is answered once, with a fresh quote")}
	case ReasonReplay, ReasonEventLog:
		return []errdefs.Remedy{errdefs.Advise("check that the host reads the event log of the TPM it quotes (the firmware's binary_bios_measurements)")}
	}
	return nil
}

func newEvidenceError(r Reason, err error, format string, a ...any) *EvidenceError {
	return &EvidenceError{Reason: r, Err: err, Detail: fmt.Sprintf(format, a...)}
}

// PolicyError is a host whose proven boot a policy does not accept.
type PolicyError struct {
	Policy string
	Class  string
	// Mismatches are the PCRs whose values the policy does not accept for
	// the class, against the closest accepted set.
	Mismatches []Mismatch
	// NoClass: the policy accepts no values for the class.
	NoClass bool
	// SecureBootOff: the host booted with Secure Boot off and the policy
	// requires it.
	SecureBootOff bool
}

// Mismatch is one PCR whose value differs from the policy.
type Mismatch struct {
	PCR  int
	Got  []byte
	Want []byte
}

func (e *PolicyError) Error() string {
	var parts []string
	if e.NoClass && e.Class == "" {
		parts = append(parts, fmt.Sprintf("policy %s accepts no boot yet", e.Policy))
	} else if e.NoClass {
		parts = append(parts, fmt.Sprintf("policy %s accepts no hardware class %q", e.Policy, e.Class))
	}
	if len(e.Mismatches) > 0 {
		pcrs := make([]int, len(e.Mismatches))
		for i, m := range e.Mismatches {
			pcrs[i] = m.PCR
		}
		verb := "differs"
		if len(pcrs) > 1 {
			verb = "differ"
		}
		parts = append(parts, fmt.Sprintf("%s %s from policy %s (class %s)", pcrList(pcrs), verb, e.Policy, e.Class))
	}
	if e.SecureBootOff {
		parts = append(parts, fmt.Sprintf("Secure Boot is off and policy %s requires it", e.Policy))
	}
	if len(parts) == 0 {
		return fmt.Sprintf("policy %s refused the host", e.Policy)
	}
	return strings.Join(parts, "; ")
}

// Unwrap returns the kind.
func (e *PolicyError) Unwrap() error { return errdefs.ErrPermissionDenied }

// Remedies returns the ways out.
func (e *PolicyError) Remedies() []errdefs.Remedy {
	var out []errdefs.Remedy
	if e.SecureBootOff {
		out = append(out, errdefs.Advise("turn Secure Boot on in the host's firmware"))
	}
	switch {
	case (e.NoClass || len(e.Mismatches) > 0) && e.Class != "":
		out = append(out, errdefs.Advise("if the host's firmware or boot configuration changed on purpose, capture policy %s again from a reference host of class %s", e.Policy, e.Class))
	case e.NoClass:
		out = append(out, errdefs.Advise("capture policy %s from a reference host", e.Policy))
	}
	return out
}

// pcrList names PCRs: "PCR 7", "PCRs 4, 7".
func pcrList(pcrs []int) string {
	if len(pcrs) == 1 {
		return "PCR " + strconv.Itoa(pcrs[0])
	}
	s := make([]string, len(pcrs))
	for i, p := range pcrs {
		s[i] = strconv.Itoa(p)
	}
	return "PCRs " + strings.Join(s, ", ")
}
