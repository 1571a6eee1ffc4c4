package keybroker

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/seal"
)

// public returns h's own guardian as another host receives it: its
// certificates only.
func public(t testing.TB, h *Broker) *guardian.Guardian {
	t.Helper()
	pem, err := local(t, h).ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	g, err := guardian.ParseCertificates(pem)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func hasAction(err error, a errdefs.Action, arg, val string) bool {
	for _, r := range errdefs.Remedies(err) {
		if r.Action == a && (arg == "" || r.Args[arg] == val) {
			return true
		}
	}
	return false
}

func TestTrust(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	h := openHost(t, root)
	a, b := newHost(t), newHost(t)
	if added, err := h.Trust(public(t, a)); err != nil || !added {
		t.Fatalf("Trust(A) = %v, %v; want true", added, err)
	}
	if added, err := h.Trust(public(t, a)); err != nil || added {
		t.Errorf("Trust(A) again = %v, %v; want false, nil", added, err)
	}
	if _, err := h.Trust(public(t, h)); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Trust(own guardian) = %v; want errdefs.ErrAlreadyExists", err)
	}
	if _, err := h.Trust(public(t, b)); err != nil {
		t.Fatal(err)
	}
	// The list survives the keystore being opened again, as another
	// command on the host sees it.
	h2 := openHost(t, root)
	got, err := h2.Trusted()
	if err != nil {
		t.Fatal(err)
	}
	var fps []string
	for _, g := range got {
		fps = append(fps, g.Fingerprint())
		if g.HasPrivate() {
			t.Errorf("trusted guardian %v holds a private key", g)
		}
	}
	if len(fps) != 2 || !strings.Contains(strings.Join(fps, " "), local(t, a).Fingerprint()) || !strings.Contains(strings.Join(fps, " "), local(t, b).Fingerprint()) {
		t.Fatalf("Trusted = %v; want A and B", fps)
	}
	// Both test hosts' guardians are named host:<hostname>: a name is ambiguous.
	if _, err := h2.Untrust(local(t, a).Name()); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "give a fingerprint") {
		t.Errorf("Untrust(shared name) = %v; want an invalid-argument error asking for a fingerprint", err)
	}
	if _, err := h2.Untrust("0123456789abcdef"); !errors.Is(err, errdefs.ErrNotFound) || !hasAction(err, errdefs.ActionGuardianList, "", "") {
		t.Errorf("Untrust(unknown) = %v; want not found, with the guardian list as remedy", err)
	}
	g, err := h2.Untrust(strings.ToUpper(local(t, a).Fingerprint()[:12]))
	if err != nil || g.Fingerprint() != local(t, a).Fingerprint() {
		t.Fatalf("Untrust(A's fingerprint prefix) = %v, %v", g, err)
	}
	if got, _ := h2.Trusted(); len(got) != 1 || got[0].Fingerprint() != local(t, b).Fingerprint() {
		t.Errorf("Trusted after untrusting A: %v; want B only", got)
	}
}

// TestForeignOwnerSwap: whoever can write a bundle replaces its TPM with
// one of their own, owned by their guardian and granted to this host (so
// this host's guardian opens it, and they know its key). This host refuses
// it, naming the owner, and changes nothing; once told to trust that owner
// it opens it.
func TestForeignOwnerSwap(t *testing.T) {
	t.Parallel()
	h, mallory := newHost(t), newHost(t)
	bundle, _ := newTPM(t, h)
	if _, err := h.OpenTPM(bundle); err != nil {
		t.Fatalf("this host's own TPM: %v", err)
	}
	hers, o := newTPM(t, mallory)
	if _, err := mallory.Grant(hers, public(t, h)); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{ProtectorFile, seal.StateFileName, "permall.a.sealed"} {
		if err := os.Remove(filepath.Join(bundle, f)); err != nil {
			t.Fatal(err)
		}
	}
	copyState(t, hers, bundle)
	before, ksBefore := snapshot(t, bundle), treeSnapshot(t, h.Keystore().Dir())

	got, err := h.OpenTPM(bundle)
	var untrusted *UntrustedOwnerError
	if !errors.As(err, &untrusted) {
		t.Fatalf("OpenTPM(swapped TPM) = %+v, %v; want an *UntrustedOwnerError", got, err)
	}
	fp := local(t, mallory).Fingerprint()
	if untrusted.OwnerFingerprint != fp || untrusted.Owner != local(t, mallory).Name() || untrusted.TPM != o.TPM || untrusted.Dir != bundle {
		t.Errorf("error names %+v; want owner %s (%s), TPM %s in %s", untrusted, local(t, mallory).Name(), fp, o.TPM, bundle)
	}
	if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), fp) {
		t.Errorf("err = %v; want permission denied naming the owner's fingerprint", err)
	}
	if !hasAction(err, errdefs.ActionGuardianTrust, "certs", "owner.pem") || !hasAction(err, errdefs.ActionGuardianExportCerts, "file", "owner.pem") {
		t.Errorf("remedies %+v; want exporting the owner's certificates and trusting them", errdefs.Remedies(err))
	}
	if !sameFiles(snapshot(t, bundle), before) {
		t.Error("the refused open changed the bundle's TPM files")
	}
	if !sameFiles(treeSnapshot(t, h.Keystore().Dir()), ksBefore) {
		t.Error("the refused open changed the keystore")
	}

	// An imported key is the user's acceptance of that one TPM.
	t.Run("imported key", func(t *testing.T) {
		hi := newHost(t)
		copyDir := filepath.Join(t.TempDir(), "tpm")
		copyState(t, bundle, copyDir)
		if err := hi.importKey(o.TPM, o.Key.bytes(), false); err != nil {
			t.Fatal(err)
		}
		if got, err := hi.OpenTPM(copyDir); err != nil || got.By != "imported key" || !bytes.Equal(got.Key.bytes(), o.Key.bytes()) {
			t.Errorf("OpenTPM with the TPM's key imported = %+v, %v; want it opened by the imported key", got, err)
		}
	})

	if _, err := h.Trust(public(t, mallory)); err != nil {
		t.Fatal(err)
	}
	if got, err := h.OpenTPM(bundle); err != nil || !bytes.Equal(got.Key.bytes(), o.Key.bytes()) || got.By != local(t, h).Name() {
		t.Fatalf("OpenTPM after trusting the owner = %+v, %v; want it opened by this host's guardian", got, err)
	}
	if _, err := h.Untrust(fp); err != nil {
		t.Fatal(err)
	}
	if _, err := h.OpenTPM(bundle); !errors.As(err, &untrusted) {
		t.Errorf("OpenTPM after untrusting the owner = %v; want an *UntrustedOwnerError", err)
	}
}

// treeSnapshot maps every regular file under dir to its contents.
func treeSnapshot(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	m := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() || d.Name() == ".lock" {
			return err
		}
		b, err := os.ReadFile(p)
		m[p] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}
