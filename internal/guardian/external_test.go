package guardian

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"io"
	"strings"
	"testing"

	"github.com/google/uuid"
)

// hsmSigner and hsmKX stand for keys in a TPM or HSM: they expose only the
// crypto.Signer and ecdh.KeyExchanger interfaces, never the key.
type hsmSigner struct{ k *ecdsa.PrivateKey }

func (s hsmSigner) Public() crypto.PublicKey { return s.k.Public() }
func (s hsmSigner) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	return s.k.Sign(r, d, o)
}

type hsmKX struct{ k *ecdh.PrivateKey }

func (x hsmKX) PublicKey() *ecdh.PublicKey             { return x.k.PublicKey() }
func (x hsmKX) Curve() ecdh.Curve                      { return x.k.Curve() }
func (x hsmKX) ECDH(p *ecdh.PublicKey) ([]byte, error) { return x.k.ECDH(p) }

func newHSMKeys(t *testing.T) (hsmSigner, hsmKX) {
	t.Helper()
	sk, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	xk, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return hsmSigner{sk}, hsmKX{xk}
}

func TestExternalKeys(t *testing.T) {
	signer, kx := newHSMKeys(t)
	g, err := NewExternal("host:hsm", signer, kx)
	if err != nil {
		t.Fatalf("NewExternal: %v", err)
	}
	if g.KEM() != DHKEMP256 || !g.HasPrivate() {
		t.Fatalf("external guardian: KEM %v, private %v", g.KEM(), g.HasPrivate())
	}

	// It owns and opens protectors, and grants others.
	dek := newDEK(t)
	p, err := NewProtector(uuid.New(), dek, g)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Grant(dek, guardianFor(t, "host:beta", MLKEM768X25519).Public(), g); err != nil {
		t.Fatalf("Grant signed by an external key: %v", err)
	}
	q, err := ParseProtector(p.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := q.Open([]*Guardian{g}); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Open with external keys: %v", err)
	}

	// Its keys cannot leave; its certificates can, and the keys re-attach.
	if _, err := g.Marshal(); err == nil || !strings.Contains(err.Error(), "outside this process") {
		t.Errorf("Marshal: err = %v, want keys-held-outside error", err)
	}
	if _, err := g.ExportPKCS12("pw"); err == nil || !strings.Contains(err.Error(), "outside this process") {
		t.Errorf("ExportPKCS12: err = %v, want keys-held-outside error", err)
	}
	certs, err := g.ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ParseCertificates(certs)
	if err != nil {
		t.Fatal(err)
	}
	again, err := pub.Attach(signer, kx)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if got, _, err := q.Open([]*Guardian{again}); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Open after Attach: %v", err)
	}

	otherSigner, otherKX := newHSMKeys(t)
	for _, tt := range []struct {
		name   string
		g      *Guardian
		signer crypto.Signer
		kx     ecdh.KeyExchanger
		want   string
	}{
		{"wrong signing key", pub, otherSigner, kx, "signing key does not match"},
		{"wrong encryption key", pub, signer, otherKX, "encryption key does not match"},
		{"hybrid guardian", guardianFor(t, "host:alpha", MLKEM768X25519).Public(), signer, kx, "only DHKEM(P-256)"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := tt.g.Attach(tt.signer, tt.kx); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Attach: err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
	x25519, _ := ecdh.X25519().GenerateKey(rand.Reader)
	if _, err := NewExternal("host:x", signer, x25519); err == nil {
		t.Error("NewExternal accepted an X25519 key")
	}
}
