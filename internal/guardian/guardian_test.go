package guardian

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/testutil"
)

var kems = []KEM{MLKEM768X25519, DHKEMP256}

// testGuardians caches guardians by name so tests share key generation.
var (
	testMu        sync.Mutex
	testGuardians = map[string]*Guardian{}
)

func guardianFor(t testing.TB, name string, kem KEM) *Guardian {
	t.Helper()
	testMu.Lock()
	defer testMu.Unlock()
	key := name + "/" + kem.String()
	if g := testGuardians[key]; g != nil {
		return g
	}
	g, err := New(name, kem)
	if err != nil {
		t.Fatalf("New(%q, %v): %v", name, kem, err)
	}
	testGuardians[key] = g
	return g
}

func newDEK(t testing.TB) []byte {
	t.Helper()
	dek := make([]byte, DEKSize)
	rand.Read(dek)
	return dek
}

func TestNew(t *testing.T) {
	for _, kem := range kems {
		t.Run(kem.String(), func(t *testing.T) {
			g := guardianFor(t, "host:alpha", kem)
			sum := sha256.Sum256(g.SigningCertificate().Raw)
			checks := []struct {
				what      string
				got, want any
			}{
				{"Name", g.Name(), "host:alpha"},
				{"Subject", g.Subject(), "CN=host:alpha"},
				{"Fingerprint", g.Fingerprint(), hex.EncodeToString(sum[:])},
				{"KEM", g.KEM(), kem},
				{"HasPrivate", g.HasPrivate(), true},
				{"Public().HasPrivate", g.Public().HasPrivate(), false},
				{"Public().Fingerprint", g.Public().Fingerprint(), g.Fingerprint()},
				{"encryption issuer", g.EncryptionCertificate().Issuer.String(), "CN=host:alpha"},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
				}
			}
		})
	}
	if _, err := New("", MLKEM768X25519); err == nil {
		t.Error("New with empty name succeeded")
	}
	if _, err := New("host:x", KEM(0x20)); err == nil || !strings.Contains(err.Error(), "unsupported KEM") {
		t.Errorf("New with X25519 KEM: err = %v, want unsupported KEM", err)
	}
}

func TestProtectorRoundTrip(t *testing.T) {
	for _, kem := range kems {
		t.Run(kem.String(), func(t *testing.T) {
			owner := guardianFor(t, "host:alpha", kem)
			other := guardianFor(t, "host:beta", DHKEMP256)
			tpm := uuid.New()
			dek := newDEK(t)
			p, err := NewProtector(tpm, dek, owner, other.Public())
			if err != nil {
				t.Fatal(err)
			}
			q, err := ParseProtector(p.Marshal())
			if err != nil {
				t.Fatalf("ParseProtector: %v", err)
			}
			if q.TPM() != tpm || q.Owner().Fingerprint() != owner.Fingerprint() {
				t.Errorf("parsed TPM %v owner %v, want %v %v", q.TPM(), q.Owner(), tpm, owner)
			}
			if got := len(q.Rows()); got != 2 {
				t.Fatalf("%d rows, want 2", got)
			}
			for _, g := range []*Guardian{owner, other} {
				got, by, err := q.Open([]*Guardian{g})
				if err != nil {
					t.Fatalf("Open with %v: %v", g, err)
				}
				if !bytes.Equal(got, dek) || by.Fingerprint() != g.Fingerprint() {
					t.Errorf("Open with %v returned a different key or guardian %v", g, by)
				}
			}
			if !bytes.Equal(q.Marshal(), p.Marshal()) {
				t.Error("Marshal after ParseProtector differs from the original")
			}
		})
	}
}

func TestNewProtectorErrors(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	tests := []struct {
		name  string
		dek   []byte
		owner *Guardian
		want  error
	}{
		{"short DEK", make([]byte, 16), owner, nil},
		{"public owner", newDEK(t), owner.Public(), ErrNotOwner},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewProtector(uuid.New(), tt.dek, tt.owner)
			if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestGrantByCertificates(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	for _, kem := range kems {
		t.Run(kem.String(), func(t *testing.T) {
			// beta lives on another host: only its certificates travel.
			beta := guardianFor(t, "host:beta", kem)
			certs, err := beta.ExportCertificates()
			if err != nil {
				t.Fatal(err)
			}
			betaPub, err := ParseCertificates(certs)
			if err != nil {
				t.Fatalf("ParseCertificates: %v", err)
			}
			if betaPub.HasPrivate() || betaPub.Fingerprint() != beta.Fingerprint() {
				t.Fatalf("ParseCertificates gave %v (private %v), want public %v", betaPub, betaPub.HasPrivate(), beta)
			}

			tpm, dek := uuid.New(), newDEK(t)
			p, err := NewProtector(tpm, dek, owner)
			if err != nil {
				t.Fatal(err)
			}
			if _, _, err := p.Open([]*Guardian{beta}); err == nil {
				t.Fatal("beta opened the protector before the grant")
			}
			opened, _, err := p.Open([]*Guardian{owner})
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Grant(opened, betaPub, owner); err != nil {
				t.Fatalf("Grant: %v", err)
			}
			q, err := ParseProtector(p.Marshal())
			if err != nil {
				t.Fatalf("ParseProtector after Grant: %v", err)
			}
			got, by, err := q.Open([]*Guardian{beta})
			if err != nil {
				t.Fatalf("Open with beta after Grant: %v", err)
			}
			if !bytes.Equal(got, dek) || !by.Equal(beta) {
				t.Error("beta unwrapped a different key")
			}
		})
	}
}

func TestGrantRevokeErrors(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	beta := guardianFor(t, "host:beta", DHKEMP256)
	gamma := guardianFor(t, "host:gamma", MLKEM768X25519)
	dek := newDEK(t)
	p, err := NewProtector(uuid.New(), dek, owner, beta)
	if err != nil {
		t.Fatal(err)
	}
	before := p.Marshal()
	tests := []struct {
		name    string
		op      func() error
		want    error
		wantMsg string
	}{
		{"grant by non-owner", func() error { return p.Grant(dek, gamma, beta) }, ErrNotOwner, "not the protector's owner"},
		{"grant by public owner", func() error { return p.Grant(dek, gamma, owner.Public()) }, ErrNotOwner, "public only"},
		{"grant with wrong DEK", func() error { return p.Grant(newDEK(t), gamma, owner) }, ErrWrongDEK, "open the protector"},
		{"grant twice", func() error { return p.Grant(dek, beta, owner) }, nil, "already holds a row"},
		{"revoke by non-owner", func() error { return p.Revoke(owner.Fingerprint(), beta) }, ErrNotOwner, ""},
		{"revoke owner", func() error { return p.Revoke(owner.Fingerprint(), owner) }, nil, "cannot revoke the owner"},
		{"revoke unknown", func() error { return p.Revoke(gamma.Fingerprint(), owner) }, nil, "no row for guardian"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.op()
			if err == nil {
				t.Fatal("succeeded")
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("err = %q, want it to mention %q", err, tt.wantMsg)
			}
			if !bytes.Equal(p.Marshal(), before) {
				t.Error("a failed operation changed the protector")
			}
		})
	}
}

func TestRevoke(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	beta := guardianFor(t, "host:beta", DHKEMP256)
	tpm, dek := uuid.New(), newDEK(t)
	p, err := NewProtector(tpm, dek, owner, beta.Public())
	if err != nil {
		t.Fatal(err)
	}
	// Fingerprints are accepted in either case, as users paste them.
	if err := p.Revoke(strings.ToUpper(beta.Fingerprint()), owner); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	q, err := ParseProtector(p.Marshal())
	if err != nil {
		t.Fatalf("ParseProtector after Revoke: %v", err)
	}
	_, _, err = q.Open([]*Guardian{beta})
	var ng *NoGuardianError
	if !errors.As(err, &ng) {
		t.Fatalf("Open by revoked guardian: err = %v, want *NoGuardianError", err)
	}
	if ng.TPM != tpm || len(ng.Rows) != 1 || ng.Rows[0].Fingerprint != owner.Fingerprint() || ng.Rows[0].Name != "host:alpha" {
		t.Errorf("NoGuardianError = %+v, want TPM %v and the single row of %v", ng, tpm, owner)
	}
	for _, want := range []string{tpm.String(), "host:alpha", owner.Fingerprint()} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	// The owner still opens it.
	if got, _, err := q.Open([]*Guardian{beta, owner}); err != nil || !bytes.Equal(got, dek) {
		t.Errorf("Open by owner after revoke: %v", err)
	}
}

// tamper decodes a marshalled protector, applies edit, and re-encodes it.
func tamper(t *testing.T, b []byte, edit func(*protectorJSON)) []byte {
	t.Helper()
	var j protectorJSON
	if err := json.Unmarshal(b, &j); err != nil {
		t.Fatal(err)
	}
	edit(&j)
	out, err := json.MarshalIndent(j, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestParseProtectorRejectsEdits(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	beta := guardianFor(t, "host:beta", DHKEMP256)
	mallory := guardianFor(t, "host:mallory", MLKEM768X25519)
	tpm, dek := uuid.New(), newDEK(t)
	p, err := NewProtector(tpm, dek, owner, beta)
	if err != nil {
		t.Fatal(err)
	}
	orig := p.Marshal()

	// Mallory's own protector for the same TPM and key (as if she had seen
	// the DEK once): its row for her is a valid wrap, but under her
	// signature, not the owner's.
	mp, err := NewProtector(tpm, dek, mallory)
	if err != nil {
		t.Fatal(err)
	}
	var mj protectorJSON
	if err := json.Unmarshal(mp.Marshal(), &mj); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name string
		edit func(*protectorJSON)
		want error
	}{
		{"row removed", func(j *protectorJSON) { j.Rows = j.Rows[:1] }, ErrTampered},
		{"row added", func(j *protectorJSON) { j.Rows = append(j.Rows, mj.Rows[0]) }, ErrTampered},
		{"row replaced", func(j *protectorJSON) { j.Rows[1] = mj.Rows[0] }, ErrTampered},
		{"rows reordered", func(j *protectorJSON) { j.Rows[0], j.Rows[1] = j.Rows[1], j.Rows[0] }, ErrTampered},
		{"signature changed", func(j *protectorJSON) { j.Signature[len(j.Signature)-1] ^= 1 }, ErrTampered},
		{"signature removed", func(j *protectorJSON) { j.Signature = nil }, ErrTampered},
		{"owner cert swapped for another row's", func(j *protectorJSON) {
			j.Owner = ownerJSON{Name: beta.Name(), Fingerprint: beta.Fingerprint(), Cert: beta.SigningCertificate().Raw}
		}, ErrTampered},
		{"owner swapped for mallory, with her row and signature", func(j *protectorJSON) {
			j.Owner, j.Signature = mj.Owner, mj.Signature
			j.Rows = append(j.Rows, mj.Rows[0])
		}, ErrTampered},
		{"owner cert swapped, no row", func(j *protectorJSON) { j.Owner = mj.Owner }, ErrTampered},
		{"owner fingerprint changed", func(j *protectorJSON) { j.Owner.Fingerprint = beta.Fingerprint() }, ErrTampered},
		{"wrap changed", func(j *protectorJSON) { j.Rows[1].Wrap[40] ^= 1 }, ErrTampered},
		{"row name changed", func(j *protectorJSON) { j.Rows[1].Name = "host:trusted" }, ErrTampered},
		{"row fingerprint changed", func(j *protectorJSON) { j.Rows[1].Fingerprint = mallory.Fingerprint() }, ErrTampered},
		{"row encryption cert swapped", func(j *protectorJSON) { j.Rows[1].EncCert = mj.Rows[0].EncCert }, ErrTampered},
		{"TPM changed", func(j *protectorJSON) { j.TPM = uuid.New() }, ErrTampered},
		{"key check changed", func(j *protectorJSON) { j.KeyCheck[0] ^= 1 }, ErrTampered},
		{"no rows", func(j *protectorJSON) { j.Rows = nil }, ErrTampered},
		{"future format", func(j *protectorJSON) { j.Format = ProtectorFormat + 1 }, nil},
		{"version lowered", func(j *protectorJSON) { j.Version-- }, ErrTampered},
		{"version raised", func(j *protectorJSON) { j.Version += 5 }, ErrTampered},
		{"version removed (read as format 2 without one)", func(j *protectorJSON) { j.Version = 0 }, ErrTampered},
		{"version removed, format 1 claimed", func(j *protectorJSON) { j.Format, j.Version = 1, 0 }, ErrTampered},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tamper(t, orig, tt.edit)
			_, err := ParseProtector(b)
			if err == nil {
				t.Fatal("ParseProtector accepted the edited protector")
			}
			t.Log(err)
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
		})
	}

	for _, bad := range [][]byte{nil, orig[:len(orig)/2], append(bytes.Clone(orig), "{}"...)} {
		if _, err := ParseProtector(bad); err == nil {
			t.Errorf("ParseProtector accepted %d bytes of malformed input", len(bad))
		}
	}
}

// An attacker can re-sign a copy of the protector with her own guardian as
// owner. The result verifies (it is her protector), but the rows copied from
// the real one are bound to the real owner and no longer open, and the
// owner is visibly hers.
func TestOwnerReplacedAndResigned(t *testing.T) {
	owner := guardianFor(t, "host:alpha", MLKEM768X25519)
	mallory := guardianFor(t, "host:mallory", MLKEM768X25519)
	tpm, dek := uuid.New(), newDEK(t)
	p, err := NewProtector(tpm, dek, owner)
	if err != nil {
		t.Fatal(err)
	}
	forged, err := ParseProtector(p.Marshal())
	if err != nil {
		t.Fatal(err)
	}
	forged.owner = mallory.Public()
	if err := forged.add(newDEK(t), mallory); err != nil {
		t.Fatal(err)
	}
	forged.keyCheck = p.keyCheck
	if err := forged.sign(mallory); err != nil {
		t.Fatal(err)
	}
	q, err := ParseProtector(forged.Marshal())
	if err != nil {
		t.Fatalf("ParseProtector: %v", err)
	}
	if q.Owner().Fingerprint() == owner.Fingerprint() {
		t.Fatal("forged protector claims the real owner")
	}
	_, _, err = q.Open([]*Guardian{owner})
	if err == nil {
		t.Fatal("the real owner's copied row opened under a forged owner")
	}
	var ng *NoGuardianError
	if errors.As(err, &ng) {
		t.Errorf("err = %v, want an unwrap failure, not NoGuardianError", err)
	}
	if _, _, err := q.Open([]*Guardian{mallory}); err == nil || !strings.Contains(err.Error(), "key check") {
		t.Errorf("mallory's row with a key of her own: err = %v, want a key check failure", err)
	}
}

func TestMarshalParse(t *testing.T) {
	for _, kem := range kems {
		g := guardianFor(t, "host:alpha", kem)
		for _, in := range []*Guardian{g, g.Public()} {
			t.Run(kem.String()+"/private="+boolString(in.HasPrivate()), func(t *testing.T) {
				b, err := in.Marshal()
				if err != nil {
					t.Fatal(err)
				}
				out, err := Parse(b)
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				if out.Fingerprint() != g.Fingerprint() || out.HasPrivate() != in.HasPrivate() || out.KEM() != kem {
					t.Errorf("Parse gave %v private=%v kem=%v", out, out.HasPrivate(), out.KEM())
				}
				if in.HasPrivate() {
					assertOpens(t, out, g)
				}
			})
		}
	}
}

func boolString(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// assertOpens checks that got's private keys work: it opens a protector made
// for want, and signs as its owner.
func assertOpens(t *testing.T, got, want *Guardian) {
	t.Helper()
	dek := newDEK(t)
	p, err := NewProtector(uuid.New(), dek, want)
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := p.Open([]*Guardian{got})
	if err != nil || !bytes.Equal(out, dek) {
		t.Fatalf("HPKE private key does not open a protector: %v", err)
	}
	if err := p.Grant(dek, guardianFor(t, "host:beta", DHKEMP256), got); err != nil {
		t.Fatalf("signing key cannot grant: %v", err)
	}
	if _, err := ParseProtector(p.Marshal()); err != nil {
		t.Fatalf("protector signed by the imported key does not verify: %v", err)
	}
}

func TestParseCertificatesErrors(t *testing.T) {
	a := guardianFor(t, "host:alpha", MLKEM768X25519)
	b := guardianFor(t, "host:beta", DHKEMP256)
	withKey, _ := a.Marshal()
	aCerts, _ := a.ExportCertificates()
	bCerts, _ := b.ExportCertificates()
	mixed := append(pemBlock(aCerts, 0), pemBlock(bCerts, 1)...)
	tests := []struct {
		name, wantMsg string
		in            []byte
	}{
		{"private key included", "PRIVATE KEY", withKey},
		{"certificates of two guardians", "not issued by the signing certificate", mixed},
		{"signing certificate only", "found 1 certificates", pemBlock(aCerts, 0)},
		{"encryption certificates only", "two encryption certificates", append(pemBlock(aCerts, 1), pemBlock(bCerts, 1)...)},
		{"truncated", "not PEM", aCerts[:len(aCerts)-40]},
		{"empty", "found 0 certificates", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseCertificates(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("err = %v, want it to mention %q", err, tt.wantMsg)
			}
		})
	}
}

// pemBlock returns the i'th PEM block of b.
func pemBlock(b []byte, i int) []byte {
	blocks := strings.SplitAfter(string(b), "-----END CERTIFICATE-----\n")
	return []byte(blocks[i])
}

func TestPKCS12(t *testing.T) {
	for _, kem := range kems {
		t.Run(kem.String(), func(t *testing.T) {
			g := guardianFor(t, "host:alpha", kem)
			pfx, err := g.ExportPKCS12("correct horse")
			if err != nil {
				t.Fatal(err)
			}
			in, err := ImportPKCS12(pfx, "correct horse")
			if err != nil {
				t.Fatalf("ImportPKCS12: %v", err)
			}
			if in.Fingerprint() != g.Fingerprint() || !in.HasPrivate() || in.KEM() != kem {
				t.Fatalf("imported %v private=%v kem=%v, want %v", in, in.HasPrivate(), in.KEM(), g)
			}
			assertOpens(t, in, g)

			_, err = ImportPKCS12(pfx, "wrong horse")
			if !errors.Is(err, ErrWrongPassword) || !strings.Contains(err.Error(), "password") {
				t.Errorf("wrong password: err = %v, want ErrWrongPassword", err)
			}
		})
	}
	g := guardianFor(t, "host:alpha", MLKEM768X25519)
	if _, err := g.Public().ExportPKCS12("pw"); err == nil || !strings.Contains(err.Error(), "ExportCertificates") {
		t.Errorf("ExportPKCS12 of a public guardian: err = %v, want advice to export certificates", err)
	}
	if _, err := g.ExportPKCS12(""); err == nil {
		t.Error("ExportPKCS12 with an empty password succeeded")
	}
	if _, err := ImportPKCS12([]byte("not a pkcs12 file"), "pw"); err == nil || errors.Is(err, ErrWrongPassword) {
		t.Errorf("ImportPKCS12 of garbage: err = %v, want a format error", err)
	}
}

// TestPKCS12OpenSSL checks the file against the real openssl: it must list
// both certificates and the private key, and what openssl prints (and
// re-exports) must be the same guardian.
func TestPKCS12OpenSSL(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		testutil.Missing(t, "openssl not installed")
	}
	for _, kem := range kems {
		t.Run(kem.String(), func(t *testing.T) {
			g := guardianFor(t, "host:alpha", kem)
			dir := t.TempDir()
			pfx, err := g.ExportPKCS12("s3cret")
			if err != nil {
				t.Fatal(err)
			}
			file := filepath.Join(dir, "guardian.p12")
			if err := os.WriteFile(file, pfx, 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(openssl, "pkcs12", "-in", file, "-passin", "pass:s3cret", "-nodes", "-info").CombinedOutput()
			if err != nil {
				t.Fatalf("openssl pkcs12 -info: %v\n%s", err, out)
			}
			text := string(out)
			if n := strings.Count(text, "-----BEGIN CERTIFICATE-----"); n != 2 {
				t.Errorf("openssl printed %d certificates, want 2:\n%s", n, text)
			}
			if n := strings.Count(text, "-----BEGIN PRIVATE KEY-----"); n != 1 {
				t.Errorf("openssl printed %d private keys, want 1:\n%s", n, text)
			}
			if !strings.Contains(text, "CN = host:alpha") {
				t.Errorf("openssl output does not name the guardian:\n%s", text)
			}

			// openssl's PEM output is a complete guardian.
			fromPEM, err := Parse(out)
			if err != nil {
				t.Fatalf("Parse(openssl output): %v", err)
			}
			if fromPEM.Fingerprint() != g.Fingerprint() || !fromPEM.HasPrivate() {
				t.Errorf("openssl output parsed as %v private=%v", fromPEM, fromPEM.HasPrivate())
			}

			// A file re-exported by openssl imports as the same guardian.
			pemFile := filepath.Join(dir, "guardian.pem")
			if err := os.WriteFile(pemFile, out, 0o600); err != nil {
				t.Fatal(err)
			}
			reFile := filepath.Join(dir, "openssl.p12")
			if out, err := exec.Command(openssl, "pkcs12", "-export", "-in", pemFile, "-out", reFile, "-passout", "pass:other").CombinedOutput(); err != nil {
				t.Fatalf("openssl pkcs12 -export: %v\n%s", err, out)
			}
			re, err := os.ReadFile(reFile)
			if err != nil {
				t.Fatal(err)
			}
			in, err := ImportPKCS12(re, "other")
			if err != nil {
				t.Fatalf("ImportPKCS12 of openssl's export: %v", err)
			}
			if in.Fingerprint() != g.Fingerprint() {
				t.Errorf("openssl round trip gave %v, want %v", in, g)
			}
			assertOpens(t, in, g)

			if out, err := exec.Command(openssl, "pkcs12", "-in", file, "-passin", "pass:nope", "-nodes", "-info").CombinedOutput(); err == nil {
				t.Errorf("openssl accepted a wrong password:\n%s", out)
			}
		})
	}
}

func TestMigrationKey(t *testing.T) {
	dek := make([]byte, 32)
	for i := range dek {
		dek[i] = byte(i)
	}
	// From: openssl kdf -keylen 32 -kdfopt digest:SHA256 -kdfopt hexkey:0001…1f
	//       -kdfopt info:"vtpm migration key v1" HKDF
	const want = "20d3d44d76996c573b153e3e93356d87be4576da9ae9c98c7d32446f9011eb2d"
	if got := hex.EncodeToString(MigrationKey(dek)); got != want {
		t.Errorf("MigrationKey = %s, want %s", got, want)
	}
	other := bytes.Clone(dek)
	other[0] ^= 1
	if bytes.Equal(MigrationKey(dek), MigrationKey(other)) {
		t.Error("different data keys give the same migration key")
	}
}

// TestErrorKinds: the package's errors match the errdefs kind a front end
// maps them to.
func TestErrorKinds(t *testing.T) {
	for _, tt := range []struct {
		err  error
		kind error
	}{
		{fmt.Errorf("grant: %w", ErrNotOwner), errdefs.ErrPermissionDenied},
		{ErrWrongDEK, errdefs.ErrInvalidArgument},
		{fmt.Errorf("read: %w", ErrTampered), errdefs.ErrDataLoss},
		{ErrWrongPassword, errdefs.ErrPermissionDenied},
		{&NoGuardianError{TPM: uuid.New()}, errdefs.ErrPermissionDenied},
	} {
		if got := errdefs.KindOf(tt.err); got != tt.kind {
			t.Errorf("KindOf(%v) = %v, want %v", tt.err, got, tt.kind)
		}
	}
}
