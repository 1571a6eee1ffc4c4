package keybroker

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/state"
)

// publicOnly is g as another host knows it: its certificates.
func publicOnly(t *testing.T, g *guardian.Guardian) *guardian.Guardian {
	t.Helper()
	pem, err := g.ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	p, err := guardian.ParseCertificates(pem)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestGrantRevoke(t *testing.T) {
	a, b := newHost(t), newHost(t)
	dir, _ := newTPM(t, a)
	gb := publicOnly(t, local(t, b))
	if _, err := b.Grant(dir, gb); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("grant on a host that is not the owner: %v; want permission denied", err)
	}
	p, err := a.Grant(dir, gb)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Rows()) != 2 {
		t.Fatalf("protector after grant has %d rows, want 2", len(p.Rows()))
	}
	var untrusted *UntrustedOwnerError
	if _, err := b.OpenTPM(dir); !errors.As(err, &untrusted) {
		t.Errorf("the granted host opens the TPM of an owner it does not trust: %v", err)
	}
	if _, err := b.Trust(publicOnly(t, local(t, a))); err != nil {
		t.Fatal(err)
	}
	if _, err := b.OpenTPM(dir); err != nil {
		t.Errorf("the granted host, trusting the owner, cannot open the TPM: %v", err)
	}
	show := errdefs.Do(errdefs.ActionProtectorShow, "tpm", dir).WithNote("list the protector's guardians")
	tests := []struct {
		name string
		ref  string
		kind error
	}{
		{"unknown guardian", "0123456789abcdef", errdefs.ErrNotFound},
		{"a name both guardians share", gb.Name(), errdefs.ErrInvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, dir)
			_, err := a.Revoke(dir, tc.ref)
			if !errors.Is(err, tc.kind) || !slices.ContainsFunc(errdefs.Remedies(err), show.Equal) {
				t.Errorf("Revoke(%q): %v, remedies %+v; want %v with %+v", tc.ref, err, errdefs.Remedies(err), tc.kind, show)
			}
			if !sameFiles(snapshot(t, dir), before) {
				t.Error("a refused revoke changed the TPM's directory")
			}
		})
	}
	if _, err := b.Revoke(dir, gb.Fingerprint()); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("revoke on a host that is not the owner: %v; want permission denied", err)
	}
	if p, err = a.Revoke(dir, gb.Fingerprint()[:16]); err != nil || len(p.Rows()) != 1 {
		t.Fatalf("revoke by fingerprint prefix: %v", err)
	}
	if _, err := b.OpenTPM(dir); err == nil {
		t.Error("the revoked host still opens the TPM")
	}
}

func TestExportImportKey(t *testing.T) {
	a, b := newHost(t), newHost(t)
	dir, o := newTPM(t, a)
	empty := t.TempDir()
	if _, _, err := a.ExportKey(empty, "pp"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("ExportKey of an empty directory: %v; want not found", err)
	}
	if got := snapshot(t, empty); len(got) != 0 {
		t.Errorf("ExportKey provisioned a TPM in an empty directory: %v", got)
	}
	if _, _, err := b.ExportKey(dir, "pp"); err == nil {
		t.Error("a host that cannot open the TPM exported its key")
	}
	id, file, err := a.ExportKey(dir, "a long passphrase")
	if err != nil || id != o.TPM {
		t.Fatalf("ExportKey: %v, TPM %s; want %s", err, id, o.TPM)
	}
	var kf *KeyFileError
	if _, err := b.ImportKeyFile("tpm.key", file, "wrong", false); !errors.As(err, &kf) || !strings.HasPrefix(err.Error(), "tpm.key: ") {
		t.Errorf("import with a wrong passphrase: %v; want a KeyFileError naming tpm.key", err)
	}
	if id, err := b.ImportKeyFile("tpm.key", file, "a long passphrase", false); err != nil || id != o.TPM {
		t.Fatalf("ImportKeyFile: %v, TPM %s", err, id)
	}
	got, err := b.OpenTPM(dir)
	if err != nil || !bytes.Equal(got.Key.bytes(), o.Key.bytes()) || got.By != "imported key" {
		t.Fatalf("OpenTPM with the imported key: %v", err)
	}
}

func TestPickAndImportPKCS12(t *testing.T) {
	a, b := newHost(t), newHost(t)
	ga := local(t, a)
	p12, err := ga.ExportPKCS12("pw")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.ImportPKCS12(filepath.Join("x", "a.p12"), p12, "bad", false); err == nil {
		t.Error("imported with a wrong password")
	}
	if g, err := b.ImportPKCS12("a.p12", p12, "pw", false); err != nil || g.Fingerprint() != ga.Fingerprint() {
		t.Fatalf("ImportPKCS12: %v", err)
	}
	for _, tc := range []struct {
		ref   string
		want  string
		local bool
	}{
		{"", local(t, b).Fingerprint(), true},
		{ga.Fingerprint()[:12], ga.Fingerprint(), false},
	} {
		g, isLocal, err := b.Pick(tc.ref)
		if err != nil || g.Fingerprint() != tc.want || isLocal != tc.local {
			t.Errorf("Pick(%q) = %v, %v, %v; want %s, %v", tc.ref, g, isLocal, err, tc.want, tc.local)
		}
	}
}

func TestKeyFor(t *testing.T) {
	h := newHost(t)
	file := filepath.Join(t.TempDir(), "key")
	given := bytes.Repeat([]byte{7}, 32)
	if err := os.WriteFile(file, []byte(hex.EncodeToString(given)), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "staging")
	// keyBytes is the raw key behind a handed-out key (this package's own).
	keyBytes := func(k state.SealKey) []byte {
		if kk, ok := k.(*Key); ok {
			return kk.bytes()
		}
		return nil
	}
	if k, err := h.KeyFor("file=" + file)(dir); err != nil || !bytes.Equal(keyBytes(k), given) {
		t.Errorf("KeyFor(file=): %x, %v; want the key in the file", keyBytes(k), err)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Error("KeyFor with a --data-key wrote into the directory")
	}
	k, err := h.KeyFor("")(dir)
	if err != nil || len(keyBytes(k)) != 32 {
		t.Fatalf("KeyFor(\"\"): %v", err)
	}
	if o, err := h.OpenTPM(dir); err != nil || !bytes.Equal(o.Key.bytes(), keyBytes(k)) {
		t.Errorf("the new key is not the one the directory's protector holds: %v", err)
	}
}

// TestExportGuardian: certificates only need no password and are public; a
// PKCS#12 export asks for its password and is its owner's alone.
func TestExportGuardian(t *testing.T) {
	h := newHost(t)
	asked := 0
	pw := func() (string, error) { asked++; return "pw", nil }
	tests := []struct {
		name      string
		ref       string
		certsOnly bool
		password  func() (string, error)
		perm      os.FileMode
		asked     int
		fails     bool
	}{
		{"certificates", "", true, pw, 0o644, 0, false},
		{"pkcs12", "", false, pw, 0o600, 1, false},
		{"no password", "", false, func() (string, error) { asked++; return "", errors.New("no password") }, 0, 1, true},
		{"unknown guardian", "nope", false, pw, 0, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			asked = 0
			data, perm, err := h.ExportGuardian(tt.ref, tt.certsOnly, tt.password)
			if (err != nil) != tt.fails || perm != tt.perm || asked != tt.asked {
				t.Fatalf("ExportGuardian: %v, mode %o, password asked %d times; want failure %v, mode %o, asked %d",
					err, perm, asked, tt.fails, tt.perm, tt.asked)
			}
			switch {
			case tt.fails:
			case tt.certsOnly:
				if _, err := guardian.ParseCertificates(data); err != nil {
					t.Errorf("exported certificates do not parse: %v", err)
				}
			default:
				if _, err := guardian.ImportPKCS12(data, "pw"); err != nil {
					t.Errorf("exported PKCS#12 does not import: %v", err)
				}
			}
		})
	}
}
