package guardian

import (
	"bytes"
	"encoding/json"
	"encoding/pem"
	"errors"
	"strings"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

// formatOne returns p as a format 1 file, as vtpm wrote protectors before
// they had versions.
func formatOne(t *testing.T, p *Protector, owner *Guardian) []byte {
	t.Helper()
	q := *p
	q.version = 0
	if err := q.sign(owner); err != nil {
		t.Fatal(err)
	}
	b := q.Marshal()
	var j map[string]any
	if err := json.Unmarshal(b, &j); err != nil {
		t.Fatal(err)
	}
	if j["format"] != float64(1) || j["version"] != nil {
		t.Fatalf("a version 0 protector is written as format %v, version %v; want format 1 without a version", j["format"], j["version"])
	}
	return b
}

func TestProtectorVersions(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	beta := guardianFor(t, "host:beta", DHKEMP256)
	gamma := guardianFor(t, "host:gamma", MLKEM768X25519)
	tpm, dek := uuid.New(), newDEK(t)
	p, err := NewProtector(tpm, dek, owner, beta)
	if err != nil {
		t.Fatal(err)
	}
	reparse := func(t *testing.T, p *Protector) *Protector {
		t.Helper()
		q, err := ParseProtector(p.Marshal())
		if err != nil {
			t.Fatalf("ParseProtector: %v", err)
		}
		if q.Version() != p.Version() {
			t.Fatalf("version %d read back as %d", p.Version(), q.Version())
		}
		return q
	}
	steps := []struct {
		name    string
		change  func(p *Protector) (*Protector, error)
		version uint64
		opens   []*Guardian
		shut    []*Guardian
	}{
		{"new", func(p *Protector) (*Protector, error) { return p, nil }, 1, []*Guardian{owner, beta}, []*Guardian{gamma}},
		{"grant", func(p *Protector) (*Protector, error) { return p, p.Grant(dek, gamma.Public(), owner) }, 2, []*Guardian{gamma}, nil},
		{"revoke", func(p *Protector) (*Protector, error) { return p, p.Revoke(gamma.Fingerprint(), owner) }, 3, []*Guardian{beta}, []*Guardian{gamma}},
		{"rekey dropping beta", func(p *Protector) (*Protector, error) {
			dek = newDEK(t)
			return p.Rekey(dek, owner, strings.ToUpper(beta.Fingerprint()))
		}, 4, []*Guardian{owner}, []*Guardian{beta, gamma}},
		{"rekey dropping nobody", func(p *Protector) (*Protector, error) {
			dek = newDEK(t)
			return p.Rekey(dek, owner)
		}, 5, []*Guardian{owner}, []*Guardian{beta}},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			before := p.Marshal()
			q, err := s.change(p)
			if err != nil {
				t.Fatal(err)
			}
			if q != p && !bytes.Equal(p.Marshal(), before) {
				t.Error("Rekey changed the protector it was called on")
			}
			p = reparse(t, q)
			if p.Version() != s.version {
				t.Errorf("version %d; want %d", p.Version(), s.version)
			}
			for _, g := range s.opens {
				got, _, err := p.Open([]*Guardian{g})
				if err != nil || !bytes.Equal(got, dek) {
					t.Errorf("%v: Open = %v; want the current data key", g, err)
				}
			}
			var none *NoGuardianError
			for _, g := range s.shut {
				if _, _, err := p.Open([]*Guardian{g}); !errors.As(err, &none) {
					t.Errorf("%v: Open = %v; want a *NoGuardianError", g, err)
				}
			}
			if !p.Holds(dek) {
				t.Error("the protector does not hold the current data key")
			}
		})
	}
}

func TestRekeyErrors(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	beta := guardianFor(t, "host:beta", DHKEMP256)
	gamma := guardianFor(t, "host:gamma", MLKEM768X25519)
	p, err := NewProtector(uuid.New(), newDEK(t), owner, beta)
	if err != nil {
		t.Fatal(err)
	}
	orig := p.Marshal()
	tests := []struct {
		name string
		do   func() (*Protector, error)
		is   error
		msg  string
	}{
		{"not the owner", func() (*Protector, error) { return p.Rekey(newDEK(t), beta) }, ErrNotOwner, "not the protector's owner"},
		{"public owner", func() (*Protector, error) { return p.Rekey(newDEK(t), owner.Public()) }, ErrNotOwner, "public only"},
		{"short key", func() (*Protector, error) { return p.Rekey(make([]byte, 16), owner) }, nil, "16 bytes"},
		{"drop the owner", func() (*Protector, error) { return p.Rekey(newDEK(t), owner, owner.Fingerprint()) }, nil, "cannot revoke the owner"},
		{"drop a stranger", func() (*Protector, error) { return p.Rekey(newDEK(t), owner, gamma.Fingerprint()) }, nil, "no row for guardian"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q, err := tt.do()
			if err == nil || q != nil {
				t.Fatalf("Rekey = %v, %v; want an error", q, err)
			}
			if (tt.is != nil && !errors.Is(err, tt.is)) || !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("err = %v; want %v saying %q", err, tt.is, tt.msg)
			}
			if !bytes.Equal(p.Marshal(), orig) {
				t.Error("the refused Rekey changed the protector")
			}
		})
	}
}

// A protector written before versions existed (format 1) reads as version
// 0, opens as before, and becomes format 2 with its next change, its rows
// still valid.
func TestProtectorFormatOne(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	beta := guardianFor(t, "host:beta", DHKEMP256)
	gamma := guardianFor(t, "host:gamma", MLKEM768X25519)
	tpm, dek := uuid.New(), newDEK(t)
	p, err := NewProtector(tpm, dek, owner, beta)
	if err != nil {
		t.Fatal(err)
	}
	old := formatOne(t, p, owner)
	q, err := ParseProtector(old)
	if err != nil {
		t.Fatalf("ParseProtector(format 1): %v", err)
	}
	if q.Version() != 0 {
		t.Errorf("a format 1 protector reads as version %d; want 0", q.Version())
	}
	if !bytes.Equal(q.Marshal(), old) {
		t.Error("a format 1 protector read and written again changed")
	}
	if got, _, err := q.Open([]*Guardian{beta}); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("Open(format 1) = %v", err)
	}
	if err := q.Grant(dek, gamma.Public(), owner); err != nil {
		t.Fatal(err)
	}
	r, err := ParseProtector(q.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if r.Version() != 1 {
		t.Errorf("version after the first change of a format 1 protector: %d; want 1", r.Version())
	}
	for _, g := range []*Guardian{owner, beta, gamma} {
		if got, _, err := r.Open([]*Guardian{g}); err != nil || !bytes.Equal(got, dek) {
			t.Errorf("%v cannot open the protector after its upgrade: %v", g, err)
		}
	}
	// A version spliced into the format 1 file is not the owner's.
	spliced := tamper(t, old, func(j *protectorJSON) { j.Format, j.Version = 2, 7 })
	if _, err := ParseProtector(spliced); !errors.Is(err, ErrTampered) {
		t.Errorf("format 1 file relabelled as version 7: %v; want ErrTampered", err)
	}
}

func TestImportPKCS12RefusesPEM(t *testing.T) {
	g := guardianFor(t, "host:alpha", MLKEM768X25519)
	certs, err := g.ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	withKey, err := g.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		data    []byte
		key     bool
		actions []errdefs.Action
	}{
		{"certificates", certs, false, []errdefs.Action{errdefs.ActionGuardianTrust, errdefs.ActionProtectorGrant}},
		{"certificates after blank lines", append([]byte("\n\n"), certs...), false, []errdefs.Action{errdefs.ActionGuardianTrust, errdefs.ActionProtectorGrant}},
		{"key and certificates", withKey, true, nil},
		{"openssl's printout, with bag attributes", append([]byte("Bag Attributes\n    localKeyID: 01 02\nsubject=CN = host:alpha\n"), withKey...), true, nil},
		{"one certificate", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: g.SigningCertificate().Raw}), false, []errdefs.Action{errdefs.ActionGuardianTrust, errdefs.ActionProtectorGrant}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ImportPKCS12(tt.data, "pw")
			var pe *NotPKCS12Error
			if !errors.As(err, &pe) {
				t.Fatalf("ImportPKCS12(PEM) = %v; want a *NotPKCS12Error", err)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) || errors.Is(err, ErrWrongPassword) {
				t.Errorf("the error matches kind %v; want invalid argument", errdefs.KindOf(err))
			}
			if pe.PrivateKey != tt.key || !strings.Contains(err.Error(), "PEM") || !strings.Contains(err.Error(), "not a PKCS#12 file") {
				t.Errorf("err = %q (private key %v); want it to say PEM, not PKCS#12 (private key %v)", err, pe.PrivateKey, tt.key)
			}
			for _, bad := range []string{"asn1", "ASN.1", "pkcs12:", "DecodeChain"} {
				if strings.Contains(err.Error(), bad) {
					t.Errorf("err = %q names the parser's internals (%q)", err, bad)
				}
			}
			pe.File = "a.pem"
			var got []errdefs.Action
			for _, r := range errdefs.Remedies(err) {
				if r.Action != "" {
					got = append(got, r.Action)
					if r.Args["certs"] != "a.pem" {
						t.Errorf("remedy %s has certs %q; want a.pem", r.Action, r.Args["certs"])
					}
				}
			}
			if !equalActions(got, tt.actions) {
				t.Errorf("remedy actions %v; want %v", got, tt.actions)
			}
		})
	}
}

func equalActions(a, b []errdefs.Action) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
