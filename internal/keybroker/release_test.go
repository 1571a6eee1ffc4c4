package keybroker

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/swtpm/statefile"
)

// A key the key service released (its fleet row opened elsewhere) opens a
// TPM on a host that holds no guardian of it, whoever owns the protector;
// a key that is not the TPM's, and a protector older than one this host
// has seen, are refused.
func TestAcceptReleased(t *testing.T) {
	owner := newHost(t)
	dir, o := newTPM(t, owner)
	o.Close()
	v1, err := ReadProtector(dir)
	if err != nil {
		t.Fatal(err)
	}
	fleet, err := guardian.New("fleet", guardian.MLKEM768X25519)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := owner.Grant(dir, fleet); err != nil {
		t.Fatal(err)
	}
	other, _ := newTPM(t, owner)

	host := newHost(t)
	here := filepath.Join(t.TempDir(), "tpm")
	copyState(t, dir, here)
	if _, err := host.OpenTPM(here); !errors.As(err, new(*MissingKeyError)) {
		t.Fatalf("OpenTPM on a host the protector does not admit: %v, want a MissingKeyError", err)
	}
	// release is what the key service does: open the fleet row.
	release := func(t *testing.T, dir string) (*guardian.Protector, *Key) {
		t.Helper()
		p, err := ReadProtector(dir)
		if err != nil {
			t.Fatal(err)
		}
		dek, _, err := p.Open([]*guardian.Guardian{fleet})
		if err != nil {
			// A protector without the fleet row: the owner's key.
			if dek, _, err = p.Open([]*guardian.Guardian{local(t, owner)}); err != nil {
				t.Fatal(err)
			}
		}
		k, err := newKey(p.TPM(), dek)
		if err != nil {
			t.Fatal(err)
		}
		return p, k
	}

	tests := []struct {
		name     string
		key      func(t *testing.T) (*guardian.Protector, *Key)
		opts     OpenOptions
		wantKind error // nil: accepted
	}{
		// First: this host records the protector's version as seen.
		{"the released key", func(t *testing.T) (*guardian.Protector, *Key) { return release(t, here) }, OpenOptions{}, nil},
		{"a key of another TPM", func(t *testing.T) (*guardian.Protector, *Key) {
			p, _ := release(t, here)
			_, k := release(t, other)
			return p, k
		}, OpenOptions{}, errdefs.ErrDataLoss},
		{"a random key", func(t *testing.T) (*guardian.Protector, *Key) {
			p, _ := release(t, here)
			k, err := randomKey(p.TPM())
			if err != nil {
				t.Fatal(err)
			}
			return p, k
		}, OpenOptions{}, errdefs.ErrDataLoss},
		{"an older protector than seen here", func(t *testing.T) (*guardian.Protector, *Key) {
			_, k := release(t, here)
			return v1, k
		}, OpenOptions{}, errdefs.ErrDataLoss},
		{"an older protector, rollback allowed", func(t *testing.T) (*guardian.Protector, *Key) {
			_, k := release(t, here)
			return v1, k
		}, OpenOptions{AllowRollback: true}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, k := tt.key(t)
			got, err := host.AcceptReleased(here, p, k, "key service (fleet)", tt.opts)
			if tt.wantKind == nil {
				if err != nil {
					t.Fatalf("AcceptReleased: %v", err)
				}
				defer got.Close()
				if got.TPM != p.TPM() || got.By != "key service (fleet)" {
					t.Errorf("opened TPM %s by %q", got.TPM, got.By)
				}
				return
			}
			if !errors.Is(err, tt.wantKind) {
				t.Fatalf("AcceptReleased: %v, want %v", err, tt.wantKind)
			}
		})
	}
	// The older protector's refusal says so, with the versions.
	_, k := release(t, here)
	var rb *ProtectorRollbackError
	if _, err := host.AcceptReleased(here, v1, k, "key service", OpenOptions{}); !errors.As(err, &rb) || rb.Version != 1 || rb.Seen != 2 {
		t.Errorf("an older protector: %v, want a ProtectorRollbackError of version 1, seen 2", err)
	}
}

// A TPM whose policy says to reprovision when its key is missing is not
// reprovisioned on a host that may have its key released (its protector
// has the fleet guardian's row): the key is not lost, and the caller gets
// the MissingKeyError to ask for it.
func TestReleasableIsNotReprovisioned(t *testing.T) {
	owner := newHost(t)
	dir, o := newTPM(t, owner)
	o.Close()
	fleet, err := guardian.New("fleet", guardian.MLKEM768X25519)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := owner.Grant(dir, fleet); err != nil {
		t.Fatal(err)
	}
	if err := WritePolicy(dir, Policy{OnMissingKey: "reprovision"}); err != nil {
		t.Fatal(err)
	}
	host := newHost(t)
	for _, tt := range []struct {
		name        string
		releasable  func([]guardian.Row) bool
		reprovision bool
	}{
		{"a fleet row", func(rows []guardian.Row) bool {
			for _, r := range rows {
				if r.Fingerprint == fleet.Fingerprint() {
					return true
				}
			}
			return false
		}, false},
		{"another host's row only", func([]guardian.Row) bool { return false }, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			here := filepath.Join(t.TempDir(), "tpm")
			copyState(t, dir, here)
			before := snapshot(t, here)
			got, err := host.OpenTPMWith(here, OpenOptions{Releasable: tt.releasable})
			if !tt.reprovision {
				if !errors.As(err, new(*MissingKeyError)) || !sameFiles(before, snapshot(t, here)) {
					t.Fatalf("OpenTPMWith: %v, want a MissingKeyError and the files unchanged", err)
				}
				return
			}
			if err != nil || got.Backup == "" {
				t.Fatalf("OpenTPMWith: %v, want a reprovisioned TPM", err)
			}
			got.Close()
		})
	}
}

// A released key adopts the TPM a migration stream carries only when it is
// the key of the stream's protector and the stream's record verifies
// under it.
func TestAdoptReleased(t *testing.T) {
	owner := newHost(t)
	dir, o := newTPM(t, owner)
	defer o.Close()
	raw, err := os.ReadFile(filepath.Join(dir, ProtectorFile))
	if err != nil {
		t.Fatal(err)
	}
	record := func(t *testing.T, k *Key) *AdoptRecord {
		t.Helper()
		mig, err := k.MigrationKey()
		if err != nil {
			t.Fatal(err)
		}
		defer mig.Close()
		blob, _, err := statefile.EncodeMigration([]byte("permanent state"), nil, &statefile.Key{Bytes: mig.Bytes()}, false)
		if err != nil {
			t.Fatal(err)
		}
		ext, err := AppendAdoptRecord(blob, &AdoptRecord{TPM: o.TPM, Protector: raw}, mig.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		_, rec, err := ParseAdoptRecord(ext)
		if err != nil {
			t.Fatal(err)
		}
		return rec
	}
	released := func(t *testing.T) *Key {
		t.Helper()
		k, err := newKey(o.TPM, bytes.Clone(o.Key.bytes()))
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	other, err := randomKey(o.TPM)
	if err != nil {
		t.Fatal(err)
	}
	host := newHost(t)
	for _, tt := range []struct {
		name string
		rec  *AdoptRecord
		key  *Key
		ok   bool
	}{
		{"the stream's key", record(t, o.Key), released(t), true},
		{"a stream made under another key", record(t, other), released(t), false},
		{"another key", record(t, o.Key), other, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, p, err := host.AdoptReleased(tt.rec, tt.key, "key service", OpenOptions{})
			if !tt.ok {
				if err == nil {
					got.Close()
					t.Fatal("AdoptReleased accepted it")
				}
				return
			}
			if err != nil {
				t.Fatalf("AdoptReleased: %v", err)
			}
			defer got.Close()
			if got.TPM != o.TPM || p.TPM() != o.TPM {
				t.Errorf("adopted TPM %s, protector of %s; want %s", got.TPM, p.TPM(), o.TPM)
			}
		})
	}
}
