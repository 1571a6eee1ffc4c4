package verify

import (
	"context"
	"errors"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
)

func TestKeyMode(t *testing.T) {
	g, _ := guardian.New("host:a", guardian.MLKEM768X25519)
	other, _ := guardian.New("host:b", guardian.MLKEM768X25519)
	certs, _ := g.ExportCertificates()
	h := &Host{Name: "a", Mode: ModeKey, Guardian: certs}
	ctx := context.Background()
	c, err := KeyMode{}.Challenge(ctx, h, &Begin{Mode: ModeKey})
	if err != nil {
		t.Fatal(err)
	}
	sign := func(by *guardian.Guardian, host string, nonce []byte) []byte {
		sig, err := by.SignDigest(KeyModeMessage(host, nonce))
		if err != nil {
			t.Fatal(err)
		}
		return sig
	}
	tests := []struct {
		name string
		sig  []byte
		ok   bool
	}{
		{"the registered guardian over the nonce", sign(g, "a", c.Nonce), true},
		{"another guardian", sign(other, "a", c.Nonce), false},
		{"another host's name", sign(g, "b", c.Nonce), false},
		{"another nonce", sign(g, "a", []byte("stale")), false},
		{"no signature", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := KeyMode{}.Verify(ctx, h, c, &Evidence{Signature: tt.sig}, nil)
			if tt.ok != (err == nil) {
				t.Fatalf("Verify: %v, want ok=%v", err, tt.ok)
			}
			var f *Failure
			if !tt.ok && (!errors.As(err, &f) || f.Reason != ReasonBadSignature || !errors.Is(err, errdefs.ErrPermissionDenied)) {
				t.Errorf("refusal %v is not a bad-signature Failure", err)
			}
		})
	}
	if _, err := (KeyMode{}).Challenge(ctx, h, &Begin{Mode: ModeTPM}); err == nil {
		t.Error("a key-mode host attesting in TPM mode got a challenge")
	}
}
