// Package verify is the key service's attestation contract: what a host
// registered, what it sends to attest, and the [Verifier] that judges it,
// one per attestation mode. It knows nothing of etcd or the API, so a mode
// implemented elsewhere (TPM mode, in package attest) plugs in without
// linking the service's storage.
//
// An attestation runs in two steps on any node of the service. Begin: the
// host says what it has (for TPM mode its EK and a fresh attestation key);
// the verifier returns a [Challenge] — a nonce and, for TPM mode, a
// credential only that EK's TPM can activate. The service seals the
// challenge (secrets included) into an opaque session the host sends back,
// so the second step may reach another node. Complete: the host sends its
// [Evidence]; the verifier checks it against the challenge, the host's
// registration and its policy, and returns a [Verdict] or a *Failure naming
// the reason.
package verify

import (
	"context"
	"fmt"
	"strings"

	"vtpm/internal/errdefs"
)

// Modes.
const (
	ModeKey = "key" // the host proves possession of its registered guardian's signing key
	ModeTPM = "tpm" // the host's TPM proves its boot (credential activation, quote, event log)
)

// Host is a registered host as a verifier sees it.
type Host struct {
	Name     string
	Mode     string
	Groups   []string
	Guardian []byte // PEM certificates of the host's guardian
	EK       []byte // TPM mode: the EK public key or certificate (PEM or DER) registered
	Policy   string // TPM mode: the attestation policy's name
}

// Begin is what a host sends to start attesting.
type Begin struct {
	Mode                string
	EKPublic            []byte // TPM2B_PUBLIC or PKIX DER
	EKCertificate       []byte
	AKPublic            []byte // TPM2B_PUBLIC
	AKCreateData        []byte
	AKCreateAttestation []byte
	AKCreateSignature   []byte
}

// Challenge is what the service asks of a host. Nonce, Credential and
// EncryptedSecret go to the host; Secret and State stay sealed in the
// session and come back to Verify.
type Challenge struct {
	Nonce           []byte
	Credential      []byte // TPM2_MakeCredential credentialBlob
	EncryptedSecret []byte // TPM2_MakeCredential secret
	Secret          []byte // what ActivateCredential must return
	State           []byte // anything else the verifier needs at Verify (e.g. the AK public)
}

// Evidence is the host's answer to a Challenge.
type Evidence struct {
	Signature       []byte // key mode: ASN.1 ECDSA signature, see [KeyModeMessage]
	ActivatedSecret []byte
	Quote           []byte // TPMS_ATTEST
	QuoteSignature  []byte // TPMT_SIGNATURE
	PCRs            map[uint32][]byte
	PCRBank         uint16 // TPM_ALG_ID
	EventLog        []byte // TCG PC Client binary log
}

// PCRClass is one hardware class's accepted PCR values (SHA-256 bank).
type PCRClass struct {
	Name string
	PCRs map[uint32][]byte
}

// Policy is a named attestation policy: the boots a TPM-mode host may have.
type Policy struct {
	Name              string
	Classes           []PCRClass
	RequireSecureBoot bool
}

// Verdict is a passed attestation.
type Verdict struct {
	Policy string // the policy that admitted the host, if any
	Class  string // the hardware class that matched, if any
}

// Policies finds attestation policies by name; the service passes its store.
type Policies interface {
	Policy(ctx context.Context, name string) (*Policy, error)
}

// Verifier attests hosts of one mode. Implementations are safe for
// concurrent use: every node runs one for all its requests.
type Verifier interface {
	// Mode is the mode this verifier judges (ModeKey, ModeTPM).
	Mode() string
	// Challenge checks what the host sent to begin against its
	// registration and returns what it must answer.
	Challenge(ctx context.Context, h *Host, b *Begin) (*Challenge, error)
	// Verify checks the host's evidence against the challenge it was given.
	// A refusal is a *Failure.
	Verify(ctx context.Context, h *Host, c *Challenge, e *Evidence, p Policies) (*Verdict, error)
}

// Reason says why an attestation failed.
type Reason string

// Reasons.
const (
	ReasonBadSignature   Reason = "bad-signature"   // the proof of the guardian key does not verify
	ReasonWrongEK        Reason = "wrong-ek"        // the EK is not the one registered
	ReasonActivation     Reason = "activation"      // the credential was not activated by that TPM
	ReasonBadQuote       Reason = "bad-quote"       // the quote's signature, nonce or digest does not verify
	ReasonEventLog       Reason = "event-log"       // the event log does not replay to the quoted PCRs
	ReasonPCRMismatch    Reason = "pcr-mismatch"    // a PCR differs from every class of the policy
	ReasonSecureBootOff  Reason = "secure-boot-off" // the policy requires Secure Boot
	ReasonNoPolicy       Reason = "no-policy"       // the host's policy does not exist
	ReasonMode           Reason = "mode"            // the host attests in another mode than registered
	ReasonSessionExpired Reason = "session-expired" // the challenge is too old or not this host's
)

// Failure is a refused attestation: which host, why, and the facts (the
// policy, the PCR that differs). It matches errdefs.ErrPermissionDenied.
type Failure struct {
	Host   string
	Reason Reason
	Policy string // when a policy was evaluated
	PCR    int    // ReasonPCRMismatch: the first PCR that differs; -1 otherwise
	Detail string // more facts, as prose
}

func (f *Failure) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "attestation of host %s failed (%s)", f.Host, f.Reason)
	if f.Reason == ReasonPCRMismatch && f.PCR >= 0 {
		fmt.Fprintf(&b, ": PCR %d differs from policy %s", f.PCR, f.Policy)
	} else if f.Policy != "" {
		fmt.Fprintf(&b, ": policy %s", f.Policy)
	}
	if f.Detail != "" {
		b.WriteString(": " + f.Detail)
	}
	return b.String()
}

// Is reports whether target is errdefs.ErrPermissionDenied.
func (f *Failure) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

// Fail returns a *Failure of host h for reason, with a formatted detail.
func Fail(h *Host, reason Reason, format string, a ...any) *Failure {
	return &Failure{Host: h.Name, Reason: reason, Policy: h.Policy, PCR: -1, Detail: fmt.Sprintf(format, a...)}
}
