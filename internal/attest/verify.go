package attest

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	gattest "github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"
)

const (
	secretSize = 32
	nonceSize  = 32
	// DefaultChallengeTTL is how long a challenge may be answered.
	DefaultChallengeTTL = 2 * time.Minute
)

// Challenge is what the service sends a host: a credential for its AK,
// encrypted to its registered EK, and the nonce to quote over.
type Challenge struct {
	CredentialBlob  []byte // TPM2B_ID_OBJECT's contents
	EncryptedSecret []byte // TPM2B_ENCRYPTED_SECRET's contents
	Nonce           []byte
}

// Evidence is a host's answer to a challenge.
type Evidence struct {
	Secret    []byte   // the activated credential
	Quote     []byte   // TPMS_ATTEST, as signed
	Signature []byte   // TPMT_SIGNATURE
	PCRs      [][]byte // SHA-256 values of PCRs 0–7, in order
	EventLog  []byte   // TCG PC Client crypto-agile measured-boot event log
}

// Session is the service's side of one challenge: what it expects back. It
// holds the secret, so it stays with the service (in memory or its store);
// its fields are exported so that it can be kept as JSON between calls.
type Session struct {
	EKFingerprint string    `json:"ek"`
	AKPublic      []byte    `json:"ak"`
	Nonce         []byte    `json:"nonce"`
	Secret        []byte    `json:"secret"`
	Expires       time.Time `json:"expires"`
}

// NewSession starts an attestation: registered is the EK registered for the
// host, presentedEK and akPublic what the host sent (TPMT_PUBLIC). It
// refuses an EK other than the registered one and an AK that is not a
// restricted signing key, and makes the challenge (TPM2_MakeCredential in
// software, with the EK's public area rebuilt from the registered key).
// rnd nil is crypto/rand.
func NewSession(registered crypto.PublicKey, presentedEK, akPublic []byte, now time.Time, ttl time.Duration, rnd io.Reader) (*Session, *Challenge, error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	if ttl <= 0 {
		ttl = DefaultChallengeTTL
	}
	ek, err := ParseEK(presentedEK)
	if err != nil {
		return nil, nil, err
	}
	if !sameKey(registered, ek) {
		return nil, nil, &EvidenceError{Reason: ReasonEKNotRegistered, Detail: fmt.Sprintf("registered %s, presented %s", short(EKFingerprint(registered)), short(EKFingerprint(ek)))}
	}
	ekPub, err := ekTemplate(registered)
	if err != nil {
		return nil, nil, err
	}
	ak, akName, err := CheckAK(akPublic)
	if err != nil {
		return nil, nil, err
	}
	s := &Session{
		EKFingerprint: EKFingerprint(registered),
		AKPublic:      tpm2.Marshal(ak), // TPMT_PUBLIC, whichever form came
		Nonce:         make([]byte, nonceSize),
		Secret:        make([]byte, secretSize),
		Expires:       now.Add(ttl),
	}
	if _, err := io.ReadFull(rnd, s.Nonce); err != nil {
		return nil, nil, fmt.Errorf("make a nonce: %w", err)
	}
	if _, err := io.ReadFull(rnd, s.Secret); err != nil {
		return nil, nil, fmt.Errorf("make a credential secret: %w", err)
	}
	kem, err := tpm2.ImportEncapsulationKey(&ekPub)
	if err != nil {
		return nil, nil, newEvidenceError(ReasonBadEK, err, "")
	}
	blob, encSecret, err := tpm2.CreateCredential(rnd, kem, akName, s.Secret)
	if err != nil {
		return nil, nil, fmt.Errorf("make the credential: %w", err)
	}
	return s, &Challenge{CredentialBlob: blob, EncryptedSecret: encSecret, Nonce: bytes.Clone(s.Nonce)}, nil
}

func short(fp string) string {
	if len(fp) > 16 {
		return fp[:16]
	}
	return fp
}

// Result is what verified evidence proves.
type Result struct {
	EKFingerprint string
	PCRs          [][]byte // SHA-256 values of PCRs 0–7, quoted and replayed
	SecureBoot    bool
	Events        int // events of the log replayed into PCRs 0–7
}

// Verify checks a host's evidence against the session: the credential's
// secret (the AK is in the registered TPM), the expiry, the nonce, the
// quote's PCR selection and signature, and the event log replayed to the
// quoted values. It does not judge the values: see [Policy.Evaluate].
func (s *Session) Verify(ev *Evidence, now time.Time) (*Result, error) {
	if len(ev.Secret) != len(s.Secret) || subtle.ConstantTimeCompare(ev.Secret, s.Secret) != 1 {
		return nil, newEvidenceError(ReasonActivation, nil, "the secret returned is not the credential's")
	}
	if now.After(s.Expires) {
		return nil, newEvidenceError(ReasonExpired, nil, "expired %s", s.Expires.UTC().Format(time.RFC3339))
	}
	att, err := tpm2.Unmarshal[tpm2.TPMSAttest](ev.Quote)
	if err != nil {
		return nil, newEvidenceError(ReasonQuote, err, "")
	}
	if att.Type != tpm2.TPMSTAttestQuote {
		return nil, newEvidenceError(ReasonQuote, nil, "the attestation is not a quote")
	}
	if subtle.ConstantTimeCompare(att.ExtraData.Buffer, s.Nonce) != 1 {
		return nil, newEvidenceError(ReasonNonce, nil, "")
	}
	info, err := att.Attested.Quote()
	if err != nil {
		return nil, newEvidenceError(ReasonQuote, err, "")
	}
	if sel := info.PCRSelect.PCRSelections; len(sel) != 1 || sel[0].Hash != tpm2.TPMAlgSHA256 || !slices.Equal(selected(info.PCRSelect), PCRs) {
		return nil, newEvidenceError(ReasonSelection, nil, "")
	}
	if len(ev.PCRs) != len(PCRs) {
		return nil, newEvidenceError(ReasonQuote, nil, "%d PCR values sent, want %d", len(ev.PCRs), len(PCRs))
	}
	pcrs := make([]gattest.PCR, len(PCRs))
	for i, p := range PCRs {
		if len(ev.PCRs[i]) != crypto.SHA256.Size() {
			return nil, newEvidenceError(ReasonQuote, nil, "PCR %d's value is not a SHA-256 digest", p)
		}
		pcrs[i] = gattest.PCR{Index: p, Digest: bytes.Clone(ev.PCRs[i]), DigestAlg: crypto.SHA256}
	}
	ak, err := gattest.ParseAKPublic(s.AKPublic)
	if err != nil {
		return nil, newEvidenceError(ReasonBadAK, err, "")
	}
	if err := ak.Verify(gattest.Quote{Quote: ev.Quote, Signature: ev.Signature}, pcrs, s.Nonce); err != nil {
		return nil, newEvidenceError(ReasonQuote, err, "")
	}
	events, err := replay(ev.EventLog, pcrs)
	if err != nil {
		return nil, err
	}
	sb, err := gattest.ParseSecurebootState(events)
	if err != nil {
		return nil, newEvidenceError(ReasonEventLog, err, "Secure Boot state")
	}
	return &Result{
		EKFingerprint: s.EKFingerprint,
		PCRs:          ev.PCRs,
		SecureBoot:    sb.Enabled,
		Events:        len(events),
	}, nil
}

// replay parses the event log and replays it against the quoted PCR values.
// A PCR the log says nothing about must still hold its reset value:
// go-attestation's replay accepts any value for a PCR without events.
func replay(log []byte, pcrs []gattest.PCR) ([]gattest.Event, error) {
	el, err := gattest.ParseEventLog(log)
	if err != nil {
		return nil, newEvidenceError(ReasonEventLog, err, "")
	}
	events, err := el.Verify(pcrs)
	if err != nil {
		var re gattest.ReplayError
		if errors.As(err, &re) {
			return nil, &EvidenceError{Reason: ReasonReplay, PCRs: re.InvalidPCRs}
		}
		return nil, newEvidenceError(ReasonReplay, err, "")
	}
	var bad []int
	zero := make([]byte, crypto.SHA256.Size())
	for _, p := range pcrs {
		has := slices.ContainsFunc(events, func(e gattest.Event) bool { return e.Index == p.Index })
		if !has && !bytes.Equal(p.Digest, zero) {
			bad = append(bad, p.Index)
		}
	}
	if len(bad) > 0 {
		return nil, &EvidenceError{Reason: ReasonReplay, PCRs: bad, Detail: "the log has no events for them"}
	}
	return events, nil
}

// ReplayLog replays an event log against SHA-256 values of PCRs 0–7 (not
// quoted: for tools and tests) and returns the Secure Boot state it shows.
func ReplayLog(log []byte, values [][]byte) (secureBoot bool, err error) {
	if len(values) != len(PCRs) {
		return false, newEvidenceError(ReasonQuote, nil, "%d PCR values, want %d", len(values), len(PCRs))
	}
	pcrs := make([]gattest.PCR, len(PCRs))
	for i, p := range PCRs {
		pcrs[i] = gattest.PCR{Index: p, Digest: values[i], DigestAlg: crypto.SHA256}
	}
	events, err := replay(log, pcrs)
	if err != nil {
		return false, err
	}
	sb, err := gattest.ParseSecurebootState(events)
	if err != nil {
		return false, newEvidenceError(ReasonEventLog, err, "Secure Boot state")
	}
	return sb.Enabled, nil
}
