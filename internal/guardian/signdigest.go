package guardian

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
)

// SignDigest signs a SHA-256 digest with the guardian's signing key
// (ASN.1 ECDSA), so that the guardian can prove it holds its private key
// (the key service's key-mode attestation). Callers label what they sign,
// so that the signature is not valid for anything else: a protector's
// signed bytes start with their own label.
func (g *Guardian) SignDigest(digest []byte) ([]byte, error) {
	if g.signer == nil {
		return nil, fmt.Errorf("guardian: %v is public only; sign on a host holding its private key", g)
	}
	if len(digest) != sha256.Size {
		return nil, fmt.Errorf("guardian: digest is %d bytes, want %d (SHA-256)", len(digest), sha256.Size)
	}
	return g.signer.Sign(rand.Reader, digest, crypto.SHA256)
}
