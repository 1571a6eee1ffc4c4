package keybroker

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keystore"
	"vtpm/internal/seal"
)

// A "host" in these tests is a data root of its own: its keystore and its
// guardian. Two data roots on one machine are two hosts.

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// openHost opens (creating on first use) the host whose data root is root,
// with its master key in a file, and closes it at the end of the test.
func openHost(t testing.TB, root string) *Broker {
	t.Helper()
	h, err := Open(root, keystore.Options{HostTPM: "none", Logger: quiet()})
	if err != nil {
		t.Fatalf("Open(%s): %v", root, err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func newHost(t testing.TB) *Broker { return openHost(t, t.TempDir()) }

func local(t testing.TB, h *Broker) *guardian.Guardian {
	t.Helper()
	g, err := h.Local()
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// newTPM opens a new TPM in a fresh directory on h and seals a permall blob
// into it, as a vTPM that ran once leaves it.
func newTPM(t testing.TB, h *Broker) (string, *Opened) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tpm")
	o, err := h.OpenTPM(dir)
	if err != nil {
		t.Fatalf("OpenTPM(new dir): %v", err)
	}
	if !o.Created {
		t.Fatal("OpenTPM on a new directory did not report Created")
	}
	writeBlob(t, dir, o.Key.bytes(), []byte("permanent state of "+o.TPM.String()))
	return dir, o
}

func writeBlob(t testing.TB, dir string, dek, data []byte) {
	t.Helper()
	s, err := seal.Open(dir, seal.Options{Key: dek, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Store("permall", data); err != nil {
		t.Fatal(err)
	}
}

// copyState copies a state directory's regular files (not its lock) to dst,
// as copying a VM to another host does.
func copyState(t testing.TB, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range snapshot(t, src) {
		if err := os.WriteFile(filepath.Join(dst, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// snapshot returns the regular files directly in dir (not the lock file).
func snapshot(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]byte{}
	for _, e := range entries {
		if !e.Type().IsRegular() || e.Name() == seal.LockName {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = b
	}
	return m
}

func sameFiles(a, b map[string][]byte) bool { return maps.EqualFunc(a, b, bytes.Equal) }

func TestOpenTPMNewDirectory(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	h := openHost(t, root)
	dir := filepath.Join(t.TempDir(), "vm1", "tpm")
	o, err := h.OpenTPM(dir)
	if err != nil {
		t.Fatal(err)
	}
	me := local(t, h)
	if !o.Created || o.By != me.Name() || len(o.Key.bytes()) != guardian.DEKSize || o.Backup != "" {
		t.Fatalf("OpenTPM(new) = {Created %v, By %q, %d-byte key, Backup %q}; want a created TPM opened by %q with a 32-byte key",
			o.Created, o.By, len(o.Key.bytes()), o.Backup, me.Name())
	}
	id, err := seal.Identify(dir)
	if err != nil || id != o.TPM {
		t.Fatalf("vtpm-state.json names %v (%v), OpenTPM returned TPM %v", id, err, o.TPM)
	}
	st, err := os.Stat(filepath.Join(dir, ProtectorFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("protector.json: %v, mode %v; want a 0600 file", err, st.Mode().Perm())
	}
	p, err := ReadProtector(dir)
	if err != nil {
		t.Fatal(err)
	}
	if p.TPM() != o.TPM || p.Owner().Fingerprint() != me.Fingerprint() || len(p.Rows()) != 1 {
		t.Fatalf("new protector: TPM %v, owner %s, %d rows; want TPM %v owned by this host's guardian %s, one row",
			p.TPM(), p.Owner().Fingerprint(), len(p.Rows()), o.TPM, me.Fingerprint())
	}
	for _, tmp := range []string{ProtectorFile + ".tmp"} {
		if _, err := os.Stat(filepath.Join(dir, tmp)); err == nil {
			t.Errorf("%s left behind", tmp)
		}
	}

	// The same host, opened again (as the next vTPM process does), gets the same key.
	again, err := openHost(t, root).OpenTPM(dir)
	if err != nil {
		t.Fatal(err)
	}
	if again.Created || !bytes.Equal(again.Key.bytes(), o.Key.bytes()) || again.TPM != o.TPM || again.By != me.Name() {
		t.Fatalf("reopen: Created %v, same key %v, TPM %v, By %q; want the same TPM and key, opened by %q",
			again.Created, bytes.Equal(again.Key.bytes(), o.Key.bytes()), again.TPM, again.By, me.Name())
	}
}

// TestOpenTPMOnAnotherHost copies a TPM from host A to host B and opens it
// there after each way of giving B access (or of taking it away).
func TestOpenTPMOnAnotherHost(t *testing.T) {
	t.Parallel()
	grant := func(t *testing.T, a, b *Broker, dir string, dek []byte) string {
		p, err := ReadProtector(dir)
		if err != nil {
			t.Fatal(err)
		}
		// B's guardian travels as its public certificates only.
		pem, err := local(t, b).ExportCertificates()
		if err != nil {
			t.Fatal(err)
		}
		pub, err := guardian.ParseCertificates(pem)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Grant(dek, pub, local(t, a)); err != nil {
			t.Fatal(err)
		}
		if err := WriteProtector(dir, p); err != nil {
			t.Fatal(err)
		}
		return pub.Fingerprint()
	}
	tests := []struct {
		name string
		// give changes A's copy of the TPM in dir or B's keystore; the
		// protector in dir is then copied to B.
		give   func(t *testing.T, a, b *Broker, dir string, dek []byte)
		wantBy func(a, b *Broker) string // "" when B must not open it
	}{
		{
			name: "nothing given",
			give: func(*testing.T, *Broker, *Broker, string, []byte) {},
		},
		{
			name: "A's guardian imported",
			give: func(t *testing.T, a, b *Broker, _ string, _ []byte) {
				if err := b.Import(local(t, a), false); err != nil {
					t.Fatal(err)
				}
			},
			wantBy: func(a, _ *Broker) string { return local(t, a).Name() },
		},
		{
			name: "A's guardian imported, then removed",
			give: func(t *testing.T, a, b *Broker, _ string, _ []byte) {
				if err := b.Import(local(t, a), false); err != nil {
					t.Fatal(err)
				}
				if _, err := b.Remove(local(t, a).Fingerprint()); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "B granted by its certificates, trusting A",
			give: func(t *testing.T, a, b *Broker, dir string, dek []byte) {
				grant(t, a, b, dir, dek)
				if _, err := b.Trust(local(t, a).Public()); err != nil {
					t.Fatal(err)
				}
			},
			wantBy: func(_, b *Broker) string { return local(t, b).Name() },
		},
		{
			name: "B granted, then revoked",
			give: func(t *testing.T, a, b *Broker, dir string, dek []byte) {
				fp := grant(t, a, b, dir, dek)
				p, err := ReadProtector(dir)
				if err != nil {
					t.Fatal(err)
				}
				if err := p.Revoke(fp, local(t, a)); err != nil {
					t.Fatal(err)
				}
				if err := WriteProtector(dir, p); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name: "the TPM's key imported",
			give: func(t *testing.T, _, b *Broker, dir string, dek []byte) {
				id, err := seal.Identify(dir)
				if err != nil {
					t.Fatal(err)
				}
				if err := b.importKey(id, dek, false); err != nil {
					t.Fatal(err)
				}
			},
			wantBy: func(*Broker, *Broker) string { return "imported key" },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a, b := newHost(t), newHost(t)
			srcDir, o := newTPM(t, a)
			tc.give(t, a, b, srcDir, o.Key.bytes())
			dir := filepath.Join(t.TempDir(), "copy")
			copyState(t, srcDir, dir)
			before := snapshot(t, dir)

			got, err := b.OpenTPM(dir)
			if tc.wantBy != nil {
				if err != nil {
					t.Fatalf("B cannot open the TPM: %v", err)
				}
				if want := tc.wantBy(a, b); got.By != want || !bytes.Equal(got.Key.bytes(), o.Key.bytes()) || got.TPM != o.TPM || got.Created {
					t.Fatalf("B opened {By %q, same key %v, TPM %v, Created %v}; want By %q, A's key, TPM %v",
						got.By, bytes.Equal(got.Key.bytes(), o.Key.bytes()), got.TPM, got.Created, want, o.TPM)
				}
			} else {
				var missing *MissingKeyError
				if !errors.As(err, &missing) {
					t.Fatalf("B opened the TPM (%+v, %v); want a *MissingKeyError", got, err)
				}
				aFP, bFP := local(t, a).Fingerprint(), local(t, b).Fingerprint()
				if len(missing.Rows) != 1 || missing.Rows[0].Fingerprint != aFP {
					t.Errorf("MissingKeyError.Rows = %v; want only A's guardian %s", missing.Rows, aFP)
				}
				if missing.TPM != o.TPM || missing.Dir != dir {
					t.Errorf("MissingKeyError names TPM %v in %s; want %v in %s", missing.TPM, missing.Dir, o.TPM, dir)
				}
				msg := err.Error()
				admits, holds, ok := strings.Cut(msg, "This host holds:")
				if !ok || !strings.Contains(admits, aFP) || strings.Contains(admits, bFP) || !strings.Contains(holds, bFP) {
					t.Errorf("message does not list A's guardian as admitted and B's as held:\n%s", msg)
				}
				for _, want := range []string{"cannot be opened on this host", "Ways out"} {
					if !strings.Contains(msg, want) {
						t.Errorf("message lacks %q:\n%s", want, msg)
					}
				}
				for _, want := range []errdefs.Remedy{
					errdefs.Do(errdefs.ActionGuardianImport),
					errdefs.Do(errdefs.ActionProtectorGrant),
					errdefs.Do(errdefs.ActionKeyImport),
					errdefs.Do(errdefs.ActionTPMReprovision, "tpm", dir),
				} {
					if !offers(err, want) {
						t.Errorf("ways out %+v lack %s %v", errdefs.Remedies(err), want.Action, want.Args)
					}
				}
				if !errors.Is(err, errdefs.ErrPermissionDenied) {
					t.Errorf("%v does not match errdefs.ErrPermissionDenied", err)
				}
				if !sameFiles(snapshot(t, dir), before) {
					t.Error("a refused open changed the state directory")
				}
			}
		})
	}
}

// TestOpenTPMImportedKeyMustMatch: a key imported for a TPM that does not
// open its protector (imported from another copy of the TPM, or typed
// wrong) is not the TPM's key; OpenTPM must not hand it out as one, and
// the TPM's policy applies as if no key were held.
func TestOpenTPMImportedKeyMustMatch(t *testing.T) {
	t.Parallel()
	for _, policy := range []string{"fail", "reprovision"} {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			a, b := newHost(t), newHost(t)
			srcDir, o := newTPM(t, a)
			dir := filepath.Join(t.TempDir(), "copy")
			copyState(t, srcDir, dir)
			if err := WritePolicy(dir, Policy{OnMissingKey: policy}); err != nil {
				t.Fatal(err)
			}
			wrong := make([]byte, guardian.DEKSize)
			rand.Read(wrong)
			if err := b.importKey(o.TPM, wrong, false); err != nil {
				t.Fatal(err)
			}
			got, err := b.OpenTPM(dir)
			if err == nil && bytes.Equal(got.Key.bytes(), wrong) {
				t.Fatalf("OpenTPM returned the imported key, which does not open the TPM's protector (By %q)", got.By)
			}
			switch policy {
			case "fail":
				if err == nil || !strings.Contains(err.Error(), "imported") {
					t.Fatalf("OpenTPM = %v; want an error saying the imported key does not belong to the TPM", err)
				}
			case "reprovision":
				if err != nil || got.Backup == "" || !got.Created {
					t.Fatalf("OpenTPM = %+v, %v; want the TPM reprovisioned as its policy says", got, err)
				}
			}
		})
	}
}

func TestReprovision(t *testing.T) {
	t.Parallel()
	a, b := newHost(t), newHost(t)
	srcDir, old := newTPM(t, a)
	dir := filepath.Join(t.TempDir(), "copy")
	copyState(t, srcDir, dir)
	oldFiles := snapshot(t, dir)

	// The default policy refuses and moves nothing.
	if _, err := b.OpenTPM(dir); !errors.As(err, new(*MissingKeyError)) {
		t.Fatalf("OpenTPM with the default policy: %v; want a *MissingKeyError", err)
	}
	if !sameFiles(snapshot(t, dir), oldFiles) {
		t.Fatal("a refused open changed the state directory")
	}

	if err := WritePolicy(dir, Policy{OnMissingKey: "reprovision"}); err != nil {
		t.Fatal(err)
	}
	o, err := b.OpenTPM(dir)
	if err != nil {
		t.Fatalf("OpenTPM with on-missing-key=reprovision: %v", err)
	}
	if !o.Created || o.TPM == old.TPM || bytes.Equal(o.Key.bytes(), old.Key.bytes()) || o.By != local(t, b).Name() {
		t.Fatalf("reprovisioned: Created %v, TPM %v (old %v), new key %v, By %q; want a fresh TPM with a new key owned by B",
			o.Created, o.TPM, old.TPM, !bytes.Equal(o.Key.bytes(), old.Key.bytes()), o.By)
	}
	if filepath.Dir(o.Backup) != dir || !strings.HasPrefix(filepath.Base(o.Backup), "backup-") {
		t.Fatalf("Backup = %q; want a backup-<timestamp> directory in %s", o.Backup, dir)
	}
	if got := snapshot(t, o.Backup); !sameFiles(got, oldFiles) {
		t.Errorf("backup holds %v; want exactly the old files %v, byte for byte", slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(oldFiles)))
	}
	if seal.HasBlobs(dir) {
		t.Error("old sealed blobs are still in the state directory")
	}
	if pol, err := ReadPolicy(dir); err != nil || pol.OnMissingKey != "reprovision" {
		t.Errorf("policy after reprovisioning = %+v, %v; want it kept", pol, err)
	}
	p, err := ReadProtector(dir)
	if err != nil || p.TPM() != o.TPM || p.Owner().Fingerprint() != local(t, b).Fingerprint() {
		t.Fatalf("new protector: %v; want one for TPM %v owned by B", err, o.TPM)
	}

	// The fresh TPM is B's now: opening it again changes nothing.
	again, err := b.OpenTPM(dir)
	if err != nil || again.Created || again.Backup != "" || !bytes.Equal(again.Key.bytes(), o.Key.bytes()) {
		t.Fatalf("reopen after reprovisioning: %+v, %v; want the fresh TPM's key, no new backup", again, err)
	}
	backups, _ := filepath.Glob(filepath.Join(dir, "backup-*"))
	if len(backups) != 1 {
		t.Errorf("backups: %v; want exactly one", backups)
	}
}

// protectorJSON edits: each returns the edited file.
type protectorEdit func(t *testing.T, one, two map[string]any) map[string]any

func rows(m map[string]any) []any { return m["rows"].([]any) }

func row(m map[string]any, i int) map[string]any { return rows(m)[i].(map[string]any) }

// flipB64 flips a bit in a base64 (JSON []byte) field.
func flipB64(t *testing.T, m map[string]any, key string) {
	var b []byte
	if err := json.Unmarshal([]byte(`"`+m[key].(string)+`"`), &b); err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x01
	enc, _ := json.Marshal(b)
	m[key] = strings.Trim(string(enc), `"`)
}

// TestReadProtectorRejectsEdits edits a protector by hand in each way a
// person might, and checks that the owner's own host refuses it, naming
// protector.json.
func TestReadProtectorRejectsEdits(t *testing.T) {
	t.Parallel()
	a, b := newHost(t), newHost(t)
	dir, o := newTPM(t, a)
	oneRow, err := os.ReadFile(filepath.Join(dir, ProtectorFile))
	if err != nil {
		t.Fatal(err)
	}
	p, err := ReadProtector(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Grant(o.Key.bytes(), local(t, b).Public(), local(t, a)); err != nil {
		t.Fatal(err)
	}
	twoRows := p.Marshal()

	tests := []struct {
		name     string
		edit     protectorEdit // on decoded copies of the one-row and two-row protector
		raw      func() []byte // instead of edit
		tampered bool          // errors.Is(err, guardian.ErrTampered)
	}{
		{name: "row removed", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			two["rows"] = rows(two)[:1]
			return two
		}},
		{name: "row added", tampered: true, edit: func(t *testing.T, one, two map[string]any) map[string]any {
			one["rows"] = append(rows(one), row(two, 1))
			return one
		}},
		{name: "owner's row removed", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			two["rows"] = rows(two)[1:]
			return two
		}},
		{name: "rows reordered", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			r := rows(two)
			r[0], r[1] = r[1], r[0]
			return two
		}},
		{name: "signature changed", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			flipB64(t, two, "signature")
			return two
		}},
		{name: "wrapped key changed", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			flipB64(t, row(two, 1), "wrap")
			return two
		}},
		{name: "key check changed", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			flipB64(t, two, "key_check")
			return two
		}},
		{name: "row renamed", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			row(two, 1)["name"] = "host:trusted"
			return two
		}},
		{name: "row's certificate swapped for another guardian's", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			row(two, 1)["sign_cert"] = row(two, 0)["sign_cert"]
			return two
		}},
		{name: "owner changed", tampered: true, edit: func(t *testing.T, _, two map[string]any) map[string]any {
			own := two["owner"].(map[string]any)
			own["cert"], own["name"], own["fingerprint"] = row(two, 1)["sign_cert"], row(two, 1)["name"], row(two, 1)["fingerprint"]
			return two
		}},
		{name: "truncated", raw: func() []byte { return twoRows[:len(twoRows)/2] }},
		{name: "emptied", raw: func() []byte { return nil }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var data []byte
			var err error
			if tc.raw != nil {
				data = tc.raw()
			} else {
				var one, two map[string]any
				if err := json.Unmarshal(oneRow, &one); err != nil {
					t.Fatal(err)
				}
				if err := json.Unmarshal(twoRows, &two); err != nil {
					t.Fatal(err)
				}
				if data, err = json.MarshalIndent(tc.edit(t, one, two), "", "\t"); err != nil {
					t.Fatal(err)
				}
			}
			edited := filepath.Join(t.TempDir(), "tpm")
			copyState(t, dir, edited)
			path := filepath.Join(edited, ProtectorFile)
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err = ReadProtector(edited)
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "rejected") {
				t.Fatalf("ReadProtector(edited) = %v; want an error rejecting %s", err, path)
			}
			if tc.tampered && !errors.Is(err, guardian.ErrTampered) {
				t.Errorf("error does not match guardian.ErrTampered: %v", err)
			}
			// The owner's host refuses it too, and leaves the file as it is.
			if _, err := a.OpenTPM(edited); err == nil || !strings.Contains(err.Error(), ProtectorFile) {
				t.Fatalf("OpenTPM(edited) on the owner's host = %v; want an error naming %s", err, ProtectorFile)
			}
			if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
				t.Error("OpenTPM rewrote the rejected protector")
			}
		})
	}
}

func TestOpenTPMRefusesInconsistentFiles(t *testing.T) {
	t.Parallel()
	h := newHost(t)
	tests := []struct {
		name    string
		break_  func(t *testing.T, dir string)
		wantErr []string
		wantFix []errdefs.Remedy // among the ways out
	}{
		{
			name: "sealed state without its protector",
			break_: func(t *testing.T, dir string) {
				if err := os.Remove(filepath.Join(dir, ProtectorFile)); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: []string{"no key protector", ProtectorFile},
			wantFix: []errdefs.Remedy{errdefs.Do(errdefs.ActionKeyImport)},
		},
		{
			name: "protector of another TPM",
			break_: func(t *testing.T, dir string) {
				other, _ := newTPM(t, h)
				b, err := os.ReadFile(filepath.Join(other, ProtectorFile))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, ProtectorFile), b, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: []string{"belongs to TPM", "mixed up"},
		},
		{
			name: "damaged policy",
			break_: func(t *testing.T, dir string) {
				// Only consulted when no guardian opens the TPM: make that so.
				other := newHost(t)
				src, _ := newTPM(t, other)
				for _, n := range []string{ProtectorFile, seal.StateFileName, "permall.a.sealed"} {
					b, err := os.ReadFile(filepath.Join(src, n))
					if err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
						t.Fatal(err)
					}
				}
				os.Remove(filepath.Join(dir, "permall.b.sealed"))
				if err := os.WriteFile(filepath.Join(dir, PolicyFile), []byte(`{"on_missing_key": "wipe"}`), 0o600); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: []string{`on-missing-key "wipe"`},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir, _ := newTPM(t, h)
			tc.break_(t, dir)
			before := snapshot(t, dir)
			_, err := h.OpenTPM(dir)
			if err == nil {
				t.Fatal("OpenTPM succeeded")
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q: %v", w, err)
				}
			}
			for _, w := range tc.wantFix {
				if !offers(err, w) {
					t.Errorf("ways out %+v lack %s %v", errdefs.Remedies(err), w.Action, w.Args)
				}
			}
			if !sameFiles(snapshot(t, dir), before) {
				t.Error("the refused open changed the state directory (a new protector or key must never replace a lost one)")
			}
		})
	}
}

func TestImportKey(t *testing.T) {
	t.Parallel()
	id := uuid.New()
	key := func(b byte) []byte { return bytes.Repeat([]byte{b}, guardian.DEKSize) }
	tests := []struct {
		name    string
		first   []byte
		second  []byte
		replace bool
		wantErr error
		want    []byte // held afterwards
	}{
		{name: "same key twice", first: key(1), second: key(1), want: key(1)},
		{name: "different key", first: key(1), second: key(2), wantErr: ErrConflict, want: key(1)},
		{name: "different key, replace", first: key(1), second: key(2), replace: true, want: key(2)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := newHost(t)
			if err := h.importKey(id, tc.first, false); err != nil {
				t.Fatal(err)
			}
			err := h.importKey(id, tc.second, tc.replace)
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("second ImportKey = %v; want %v", err, tc.wantErr)
			}
			if dek, ok := h.importedKey(id); !ok || !bytes.Equal(dek, tc.want) {
				t.Fatalf("held key %x; want %x", dek, tc.want)
			}
		})
	}
}

func TestGuardians(t *testing.T) {
	t.Parallel()
	a, b := newHost(t), newHost(t)
	ga, gb := local(t, a), local(t, b)
	if ga.Name() != gb.Name() || ga.Fingerprint() == gb.Fingerprint() {
		t.Fatalf("two hosts on one machine: names %q, %q, fingerprints equal %v; want the same name and different keys", ga.Name(), gb.Name(), ga.Fingerprint() == gb.Fingerprint())
	}
	if err := b.Import(ga.Public(), false); err == nil || !strings.Contains(err.Error(), "no private key") {
		t.Errorf("Import(public guardian) = %v; want a refusal", err)
	}
	if err := b.Import(ga, false); err != nil {
		t.Fatal(err)
	}
	if err := b.Import(ga, false); !errors.Is(err, ErrConflict) {
		t.Errorf("second Import = %v; want ErrConflict", err)
	}
	if err := b.Import(ga, true); err != nil {
		t.Errorf("Import with replace = %v", err)
	}
	gs, err := b.Guardians()
	if err != nil || len(gs) != 2 || gs[0].Fingerprint() != gb.Fingerprint() || gs[1].Fingerprint() != ga.Fingerprint() {
		t.Fatalf("Guardians() = %v, %v; want B's own, then A's", gs, err)
	}
	for _, tc := range []struct {
		ref     string
		want    string // fingerprint, or "" for an error
		wantErr string
	}{
		{ref: ga.Fingerprint(), want: ga.Fingerprint()},
		{ref: ga.Fingerprint()[:8], want: ga.Fingerprint()},
		{ref: gb.Fingerprint()[:12], want: gb.Fingerprint()},
		{ref: ga.Fingerprint()[:7], wantErr: "no guardian"},
		{ref: ga.Name(), wantErr: "names 2 guardians"},
		{ref: "host:nowhere", wantErr: "no guardian"},
	} {
		g, err := b.Find(tc.ref)
		switch {
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("Find(%q) = %v, %v; want an error containing %q", tc.ref, g, err, tc.wantErr)
		case tc.wantErr == "" && (err != nil || g.Fingerprint() != tc.want):
			t.Errorf("Find(%q) = %v, %v; want %s", tc.ref, g, err, tc.want)
		}
	}
	if _, err := b.Remove(gb.Fingerprint()); err == nil || !strings.Contains(err.Error(), "own guardian") {
		t.Errorf("Remove(own guardian) = %v; want a refusal", err)
	}
	if g, err := b.Remove(ga.Fingerprint()); err != nil || g.Fingerprint() != ga.Fingerprint() {
		t.Fatalf("Remove(A) = %v, %v", g, err)
	}
	if gs, err := b.Guardians(); err != nil || len(gs) != 1 {
		t.Errorf("after Remove: %v, %v; want B's own guardian only", gs, err)
	}
}

func TestPolicy(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		file    string // policy.json content; "" = none
		want    string
		wantErr string
	}{
		{name: "missing file is fail", want: "fail"},
		{name: "fail", file: `{"on_missing_key":"fail"}`, want: "fail"},
		{name: "reprovision", file: `{"on_missing_key":"reprovision"}`, want: "reprovision"},
		{name: "unknown value", file: `{"on_missing_key":"wipe"}`, wantErr: "want fail or reprovision"},
		{name: "damaged", file: `{"on_missing_key":`, wantErr: PolicyFile + " is damaged"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			if tc.file != "" {
				if err := os.WriteFile(filepath.Join(dir, PolicyFile), []byte(tc.file), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			p, err := ReadPolicy(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ReadPolicy = %+v, %v; want an error containing %q", p, err, tc.wantErr)
				}
				return
			}
			if err != nil || p.OnMissingKey != tc.want {
				t.Fatalf("ReadPolicy = %+v, %v; want %q", p, err, tc.want)
			}
		})
	}

	dir := t.TempDir()
	if err := WritePolicy(dir, Policy{OnMissingKey: "sometimes"}); err == nil {
		t.Error("WritePolicy accepted an unknown value")
	}
	if _, err := os.Stat(filepath.Join(dir, PolicyFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a refused WritePolicy left %s: %v", PolicyFile, err)
	}
	if err := WritePolicy(dir, Policy{OnMissingKey: "reprovision"}); err != nil {
		t.Fatal(err)
	}
	if p, err := ReadPolicy(dir); err != nil || p.OnMissingKey != "reprovision" {
		t.Errorf("ReadPolicy after WritePolicy = %+v, %v", p, err)
	}
}

// TestOpenTPMConcurrentStart opens a new TPM directory from several vTPM
// processes at once (here: hosts on the same data root, in goroutines), as
// when a management layer retries a start. Whoever creates the key, every
// opener must get the key that the protector left on disk holds, or an
// error; never a key that no longer opens the TPM.
func TestOpenTPMConcurrentStart(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	const openers = 4
	hosts := make([]*Broker, openers)
	for i := range hosts {
		hosts[i] = openHost(t, root)
	}
	local(t, hosts[0]) // create the host's guardian once, before the race
	for round := range 20 {
		dir := filepath.Join(t.TempDir(), "tpm")
		var (
			wg    sync.WaitGroup
			start = make(chan struct{})
			got   = make([]*Opened, openers)
			errs  = make([]error, openers)
		)
		for i, h := range hosts {
			wg.Go(func() {
				<-start
				got[i], errs[i] = h.OpenTPM(dir)
			})
		}
		close(start)
		wg.Wait()
		final, err := hosts[0].OpenTPM(dir)
		if err != nil {
			t.Fatalf("round %d: the TPM does not open after the concurrent starts: %v", round, err)
		}
		created := 0
		for i, o := range got {
			if errs[i] != nil {
				continue
			}
			if o.Created {
				created++
			}
			if o.TPM != final.TPM || !bytes.Equal(o.Key.bytes(), final.Key.bytes()) {
				t.Fatalf("round %d: opener %d got TPM %v with a key that is not the one its protector holds (TPM %v): state it seals would be lost",
					round, i, o.TPM, final.TPM)
			}
		}
		if created > 1 {
			t.Fatalf("round %d: %d openers created the TPM", round, created)
		}
	}
}

// TestReprovisionConcurrentStart reprovisions one TPM from several vTPM
// processes at once (hosts on one data root, in goroutines): one fresh TPM
// must come out, and every opener that succeeds must hold its key.
func TestReprovisionConcurrentStart(t *testing.T) {
	t.Parallel()
	a := newHost(t)
	src, _ := newTPM(t, a)
	root := t.TempDir()
	const openers = 4
	hosts := make([]*Broker, openers)
	for i := range hosts {
		hosts[i] = openHost(t, root)
	}
	local(t, hosts[0])
	for round := range 10 {
		dir := filepath.Join(t.TempDir(), "tpm")
		copyState(t, src, dir)
		if err := WritePolicy(dir, Policy{OnMissingKey: "reprovision"}); err != nil {
			t.Fatal(err)
		}
		var (
			wg    sync.WaitGroup
			start = make(chan struct{})
			got   = make([]*Opened, openers)
			errs  = make([]error, openers)
		)
		for i, h := range hosts {
			wg.Go(func() {
				<-start
				got[i], errs[i] = h.OpenTPM(dir)
			})
		}
		close(start)
		wg.Wait()
		final, err := hosts[0].OpenTPM(dir)
		if err != nil {
			t.Fatalf("round %d: the reprovisioned TPM does not open: %v", round, err)
		}
		for i, o := range got {
			if errs[i] == nil && (o.TPM != final.TPM || !bytes.Equal(o.Key.bytes(), final.Key.bytes())) {
				t.Fatalf("round %d: opener %d got TPM %v, but the directory now holds TPM %v: state it seals would be lost", round, i, o.TPM, final.TPM)
			}
		}
		if backups, _ := filepath.Glob(filepath.Join(dir, "backup-*")); len(backups) != 1 {
			t.Fatalf("round %d: backups %v; want one (the fresh TPM of one opener was moved aside by another)", round, backups)
		}
	}
}

// offers reports whether err offers a way out with want's action and (at
// least) want's arguments.
func offers(err error, want errdefs.Remedy) bool {
	return slices.ContainsFunc(errdefs.Remedies(err), func(r errdefs.Remedy) bool {
		for k, v := range want.Args {
			if r.Args[k] != v {
				return false
			}
		}
		return r.Action == want.Action
	})
}

// TestUpdatePolicy: without a value the policy is only read; with one it is
// checked and written.
func TestUpdatePolicy(t *testing.T) {
	dir := t.TempDir()
	set := func(s string) *string { return &s }
	tests := []struct {
		set     *string
		want    string
		wantErr bool
	}{
		{nil, "fail", false},
		{set("reprovision"), "reprovision", false},
		{nil, "reprovision", false},
		{set("sometimes"), "reprovision", true},
	}
	for i, tc := range tests {
		p, err := UpdatePolicy(dir, tc.set)
		if (err != nil) != tc.wantErr {
			t.Errorf("%d: UpdatePolicy: %v, want error %v", i, err, tc.wantErr)
		}
		if got, _ := ReadPolicy(dir); got.OnMissingKey != tc.want || (!tc.wantErr && p.OnMissingKey != tc.want) {
			t.Errorf("%d: policy %q (returned %q), want %q", i, got.OnMissingKey, p.OnMissingKey, tc.want)
		}
	}
}
