package client

import (
	"bytes"
	"context"
	"crypto/hpke"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/google/uuid"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
	"vtpm/internal/keyservice/verify"
)

// Prover answers the key service's attestation challenge for one mode.
type Prover interface {
	// Begin is what the host sends to start.
	Begin(ctx context.Context) (*verify.Begin, error)
	// Answer is the host's evidence for the challenge (Secret and State
	// are empty: they stay with the service).
	Answer(ctx context.Context, c *verify.Challenge) (*verify.Evidence, error)
}

// KeyProver proves possession of the host's guardian (key mode).
type KeyProver struct {
	Host     string             // the host's name, as registered
	Guardian *guardian.Guardian // with its private key
}

// Begin asks for key mode.
func (p KeyProver) Begin(context.Context) (*verify.Begin, error) {
	return &verify.Begin{Mode: verify.ModeKey}, nil
}

// Answer signs the nonce with the guardian's signing key.
func (p KeyProver) Answer(_ context.Context, c *verify.Challenge) (*verify.Evidence, error) {
	sig, err := p.Guardian.SignDigest(verify.KeyModeMessage(p.Host, c.Nonce))
	if err != nil {
		return nil, err
	}
	return &verify.Evidence{Signature: sig}, nil
}

// Host is a host's side of the key service: it attests, keeps its health
// certificate, renews it before it expires, and asks for keys. It is safe
// for concurrent use.
type Host struct {
	c      *Client
	prover Prover

	mu       sync.Mutex
	health   []byte
	notAfter time.Time
}

// NewHost returns a host that attests with prover.
func NewHost(c *Client, prover Prover) *Host { return &Host{c: c, prover: prover} }

// renewBefore is how long before its end a health certificate is renewed.
const renewBefore = time.Minute

// Attest attests the host and keeps the health certificate it gets.
func (h *Host) Attest(ctx context.Context) (notAfter time.Time, err error) {
	begin, err := h.prover.Begin(ctx)
	if err != nil {
		return time.Time{}, err
	}
	// Both steps go to whichever node answers: the session is sealed by
	// the service key that every node holds.
	br, err := unary(ctx, h.c, &ksv1.BeginAttestationRequest{
		Mode: begin.Mode, EkPublic: begin.EKPublic, EkCertificate: begin.EKCertificate, AkPublic: begin.AKPublic,
		AkCreateData: begin.AKCreateData, AkCreateAttestation: begin.AKCreateAttestation, AkCreateSignature: begin.AKCreateSignature,
	}, api.BeginAttestation)
	if err != nil {
		return time.Time{}, err
	}
	ev, err := h.prover.Answer(ctx, &verify.Challenge{Nonce: br.Nonce, Credential: br.CredentialBlob, EncryptedSecret: br.EncryptedSecret})
	if err != nil {
		return time.Time{}, err
	}
	cr, err := unary(ctx, h.c, &ksv1.CompleteAttestationRequest{
		Session: br.Session, Signature: ev.Signature, ActivatedSecret: ev.ActivatedSecret, Quote: ev.Quote,
		QuoteSignature: ev.QuoteSignature, Pcrs: ev.PCRs, PcrBank: uint32(ev.PCRBank), EventLog: ev.EventLog,
	}, api.CompleteAttestation)
	if err != nil {
		return time.Time{}, err
	}
	h.mu.Lock()
	h.health, h.notAfter = cr.HealthCertificate, time.Unix(cr.NotAfterUnix, 0)
	h.mu.Unlock()
	return h.notAfter, nil
}

// Health returns the current health certificate (DER) and its end; nil
// before the first attestation.
func (h *Host) Health() ([]byte, time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.health, h.notAfter
}

// healthy returns a health certificate valid for a while yet, attesting
// when there is none.
func (h *Host) healthy(ctx context.Context) ([]byte, error) {
	cert, notAfter := h.Health()
	if cert != nil && time.Until(notAfter) > renewBefore {
		return cert, nil
	}
	if _, err := h.Attest(ctx); err != nil {
		return nil, err
	}
	cert, _ = h.Health()
	return cert, nil
}

// Release asks the key service for the data key of the TPM whose
// protector (JSON) has a fleet row. The key comes HPKE-sealed to a
// one-time key made for this request and is held in locked memory; it is
// never stored. A retry after a lost answer reuses the request ID, so the
// service audits the release once. A health certificate that the service
// finds expired is renewed once.
func (h *Host) Release(ctx context.Context, protector []byte) (*keybroker.Key, error) {
	p, err := guardian.ParseProtector(protector)
	if err != nil {
		return nil, err
	}
	rel, err := h.release(ctx, protector, p.TPM())
	if errors.Is(err, errdefs.ErrFailedPrecondition) {
		// Expired or never issued: attest again, once.
		h.mu.Lock()
		h.health = nil
		h.mu.Unlock()
		rel, err = h.release(ctx, protector, p.TPM())
	}
	return rel, err
}

func (h *Host) release(ctx context.Context, protector []byte, tpm uuid.UUID) (*keybroker.Key, error) {
	health, err := h.healthy(ctx)
	if err != nil {
		return nil, err
	}
	kem := hpke.MLKEM768X25519()
	priv, err := kem.GenerateKey()
	if err != nil {
		return nil, err
	}
	pub := priv.PublicKey()
	reqID := uuid.NewString()
	r, err := unary(ctx, h.c, &ksv1.ReleaseKeyRequest{
		Protector: protector, HealthCertificate: health, RecipientPublicKey: pub.Bytes(), RecipientKem: uint32(kem.ID()), RequestId: reqID,
	}, api.ReleaseKey)
	if err != nil {
		return nil, err
	}
	dek, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES256GCM(), releaseInfo(tpm, reqID), r.SealedKey)
	if err != nil {
		return nil, fmt.Errorf("open the released key of TPM %s: %w", tpm, err)
	}
	defer clear(dek)
	return keybroker.ReadKey(bytes.NewReader(dek), tpm)
}

// releaseInfo must equal the service's keyservice.ReleaseInfo (this
// package does not link the service).
func releaseInfo(tpm uuid.UUID, requestID string) []byte {
	b := append([]byte("vtpm keyservice release v1"), 0)
	b = append(b, tpm[:]...)
	return append(b, requestID...)
}
