package keybroker

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/seal"
)

// readBlob loads permall from dir with dek.
func readBlob(t testing.TB, dir string, dek []byte) ([]byte, error) {
	t.Helper()
	s, err := seal.Open(dir, seal.Options{Key: dek, Logger: quiet()})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	return s.Load("permall")
}

func protectorVersion(t testing.TB, dir string) uint64 {
	t.Helper()
	p, err := ReadProtector(dir)
	if err != nil {
		t.Fatal(err)
	}
	return p.Version()
}

// TestRevokeHolds: host B was granted a TPM of host A and kept a copy of
// the protector that admitted it. After A revokes B, neither B with that
// copy put back nor A handed that copy again can open the TPM, and nothing
// on disk changes in the attempt.
func TestRevokeHolds(t *testing.T) {
	t.Parallel()
	a, b := newHost(t), newHost(t)
	dir, o := newTPM(t, a)
	state, err := readBlob(t, dir, o.Key.bytes())
	if err != nil {
		t.Fatal(err)
	}
	if v := protectorVersion(t, dir); v != 1 {
		t.Fatalf("a new TPM's protector is version %d; want 1", v)
	}
	if _, err := a.Grant(dir, public(t, b)); err != nil {
		t.Fatal(err)
	}
	if v := protectorVersion(t, dir); v != 2 {
		t.Errorf("protector version after a grant: %d; want 2", v)
	}
	if _, err := b.Trust(public(t, a)); err != nil {
		t.Fatal(err)
	}
	dirB := filepath.Join(t.TempDir(), "b")
	copyState(t, dir, dirB)
	got, err := b.OpenTPM(dirB)
	if err != nil || !bytes.Equal(got.Key.bytes(), o.Key.bytes()) {
		t.Fatalf("B, granted: %+v, %v", got, err)
	}
	granted, err := os.ReadFile(filepath.Join(dir, ProtectorFile))
	if err != nil {
		t.Fatal(err)
	}

	if _, err := a.Revoke(dir, local(t, b).Fingerprint()); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	if v := protectorVersion(t, dir); v != 3 {
		t.Errorf("protector version after the revocation: %d; want 3", v)
	}
	now, err := a.OpenTPM(dir)
	if err != nil {
		t.Fatalf("A after the revocation: %v", err)
	}
	if bytes.Equal(now.Key.bytes(), o.Key.bytes()) {
		t.Fatal("the revocation did not change the data key")
	}
	if got, err := readBlob(t, dir, now.Key.bytes()); err != nil || !bytes.Equal(got, state) {
		t.Fatalf("the re-keyed state reads %q, %v; want the state as it was", got, err)
	}
	if _, err := readBlob(t, dir, o.Key.bytes()); !errors.Is(err, seal.ErrAuth) {
		t.Errorf("the old key still reads the state: %v", err)
	}

	t.Run("B puts the granted protector back", func(t *testing.T) {
		dirB := filepath.Join(t.TempDir(), "b")
		copyState(t, dir, dirB)
		if err := os.WriteFile(filepath.Join(dirB, ProtectorFile), granted, 0o600); err != nil {
			t.Fatal(err)
		}
		before := snapshot(t, dirB)
		got, err := b.OpenTPM(dirB)
		var stale *StaleKeyError
		if !errors.As(err, &stale) {
			t.Fatalf("B with the old protector: %+v, %v; want a *StaleKeyError", got, err)
		}
		if !errors.Is(err, errdefs.ErrDataLoss) || stale.Version != 2 || !strings.Contains(err.Error(), "older than the state") {
			t.Errorf("err = %v; want data loss naming protector version 2 as older than the state", err)
		}
		if !sameFiles(snapshot(t, dirB), before) {
			t.Error("the refused open changed B's copy")
		}
	})
	t.Run("B with the current protector", func(t *testing.T) {
		dirB := filepath.Join(t.TempDir(), "b")
		copyState(t, dir, dirB)
		var missing *MissingKeyError
		if _, err := b.OpenTPM(dirB); !errors.As(err, &missing) {
			t.Fatalf("B after the revocation: %v; want a *MissingKeyError", err)
		}
	})
	t.Run("A handed the granted protector again", func(t *testing.T) {
		dirA := filepath.Join(t.TempDir(), "a")
		copyState(t, dir, dirA)
		if err := os.WriteFile(filepath.Join(dirA, ProtectorFile), granted, 0o600); err != nil {
			t.Fatal(err)
		}
		before, ks := snapshot(t, dirA), treeSnapshot(t, a.Keystore().Dir())
		_, err := a.OpenTPM(dirA)
		var rb *ProtectorRollbackError
		if !errors.As(err, &rb) || rb.Version != 2 || rb.Seen != 3 || rb.TPM != o.TPM {
			t.Fatalf("A with the old protector: %v; want a *ProtectorRollbackError (version 2, seen 3)", err)
		}
		if !errors.Is(err, errdefs.ErrDataLoss) || !strings.Contains(err.Error(), "rollback") {
			t.Errorf("err = %v; want data loss saying rollback", err)
		}
		// Deliberately: the version is let through, but the old key does
		// not open the re-keyed state either.
		var stale *StaleKeyError
		if _, err := a.OpenTPMWith(dirA, OpenOptions{AllowRollback: true}); !errors.As(err, &stale) {
			t.Errorf("A with the old protector and AllowRollback: %v; want a *StaleKeyError", err)
		}
		if !sameFiles(snapshot(t, dirA), before) || !sameFiles(treeSnapshot(t, a.Keystore().Dir()), ks) {
			t.Error("the refused opens changed the TPM's files or A's keystore")
		}
	})
}

func TestGrantRevokeRefusals(t *testing.T) {
	t.Parallel()
	a, b := newHost(t), newHost(t)
	dir, o := newTPM(t, a)
	if _, err := a.Grant(dir, public(t, b)); err != nil {
		t.Fatal(err)
	}
	fpA, fpB := local(t, a).Fingerprint(), local(t, b).Fingerprint()
	tests := []struct {
		name string
		do   func() error
		is   error
		msg  string
	}{
		{"revoke on a host that is not the owner", func() error { _, err := b.Revoke(dir, fpB); return err }, errdefs.ErrPermissionDenied, "only the owner"},
		{"grant on a host that is not the owner", func() error { _, err := b.Grant(dir, public(t, b)); return err }, errdefs.ErrPermissionDenied, fpA},
		{"revoke the owner", func() error { _, err := a.Revoke(dir, fpA); return err }, nil, "cannot revoke the owner"},
		{"revoke a stranger", func() error { _, err := a.Revoke(dir, strings.Repeat("ab", 32)); return err }, errdefs.ErrNotFound, "no guardian"},
		{"grant twice", func() error { _, err := a.Grant(dir, public(t, b)); return err }, nil, "already holds a row"},
		{"revoke while the TPM runs", func() error {
			unlock, err := seal.Lock(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer unlock()
			_, err = a.Revoke(dir, fpB)
			return err
		}, errdefs.ErrFailedPrecondition, "running"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, ks := snapshot(t, dir), treeSnapshot(t, a.Keystore().Dir())
			err := tt.do()
			if err == nil {
				t.Fatal("succeeded")
			}
			if (tt.is != nil && !errors.Is(err, tt.is)) || !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("err = %v; want %v saying %q", err, tt.is, tt.msg)
			}
			if !sameFiles(snapshot(t, dir), before) || !sameFiles(treeSnapshot(t, a.Keystore().Dir()), ks) {
				t.Error("the refused change changed the TPM's files or A's keystore")
			}
		})
	}
	// Granting needs no re-key, so it works on a running TPM.
	t.Run("grant while the TPM runs", func(t *testing.T) {
		unlock, err := seal.Lock(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer unlock()
		c := newHost(t)
		if _, err := a.Grant(dir, public(t, c)); err != nil {
			t.Fatal(err)
		}
		p, err := ReadProtector(dir)
		if err != nil || !p.Holds(o.Key.bytes()) {
			t.Fatalf("the grant changed the data key (%v)", err)
		}
	})
}

// A key this host imported for a TPM it re-keys follows the new key.
func TestRevokeReplacesImportedKey(t *testing.T) {
	t.Parallel()
	a, b := newHost(t), newHost(t)
	dir, o := newTPM(t, a)
	if err := a.importKey(o.TPM, o.Key.bytes(), false); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Grant(dir, public(t, b)); err != nil {
		t.Fatal(err)
	}
	q, err := a.Revoke(dir, local(t, b).Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	k, ok := a.importedKey(o.TPM)
	if !ok || !q.Holds(k) || bytes.Equal(k, o.Key.bytes()) {
		t.Error("the imported key was not replaced by the new data key")
	}
}
