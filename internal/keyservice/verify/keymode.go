package verify

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"fmt"

	"vtpm/internal/guardian"
)

// keyModeLabel starts the message a key-mode host signs, so the signature
// cannot be taken for one over anything else the guardian signs.
const keyModeLabel = "vtpm keyservice key-mode attestation v1"

// KeyModeMessage is the SHA-256 digest a key-mode host signs with its
// guardian's signing key: the label, a zero byte, the host's name, a zero
// byte, and the nonce.
func KeyModeMessage(host string, nonce []byte) []byte {
	h := sha256.New()
	h.Write([]byte(keyModeLabel))
	h.Write([]byte{0})
	h.Write([]byte(host))
	h.Write([]byte{0})
	h.Write(nonce)
	return h.Sum(nil)
}

// KeyMode verifies that a host holds the private key of its registered
// guardian. It says nothing of how the host booted: TPM mode does.
type KeyMode struct{}

// Mode returns ModeKey.
func (KeyMode) Mode() string { return ModeKey }

// Challenge returns a fresh 32-byte nonce.
func (KeyMode) Challenge(_ context.Context, h *Host, b *Begin) (*Challenge, error) {
	if b.Mode != "" && b.Mode != ModeKey {
		return nil, Fail(h, ReasonMode, "host is registered for %s mode, attested in %s mode", ModeKey, b.Mode)
	}
	nonce := make([]byte, 32)
	rand.Read(nonce)
	return &Challenge{Nonce: nonce}, nil
}

// Verify checks the signature over KeyModeMessage with the registered
// guardian's signing certificate.
func (KeyMode) Verify(_ context.Context, h *Host, c *Challenge, e *Evidence, _ Policies) (*Verdict, error) {
	g, err := guardian.ParseCertificates(h.Guardian)
	if err != nil {
		return nil, fmt.Errorf("host %s: registered guardian: %w", h.Name, err)
	}
	pub := g.SigningCertificate().PublicKey.(*ecdsa.PublicKey)
	if !ecdsa.VerifyASN1(pub, KeyModeMessage(h.Name, c.Nonce), e.Signature) {
		return nil, Fail(h, ReasonBadSignature, "the nonce was not signed by guardian %s", g)
	}
	return &Verdict{}, nil
}
