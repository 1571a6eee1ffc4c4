package instance_test

import (
	"crypto/rand"
	"encoding/hex"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
)

// tamperFixture is manufactured state shared by the tamper cases: TPM A
// (counter 1, then 2) with a copy of its permall files from when the counter
// was 1; TPM B, another TPM sealed under A's data key (--data-key); and TPM C,
// another TPM with its own key from its own key protector.
type tamperFixture struct {
	home             string            // data root: keystore with keys and generation records
	dirA, dirB, dirC string            // state directories
	old              map[string][]byte // A's permall slots at counter 1
	uuidA            string
	uuidB            string
	uuidC            string
}

func manufactureTamperFixture(t *testing.T) *tamperFixture {
	t.Helper()
	base := t.TempDir()
	f := &tamperFixture{
		home: filepath.Join(base, "home"),
		dirA: filepath.Join(base, "a"),
		dirB: filepath.Join(base, "b"),
		dirC: filepath.Join(base, "c"),
		old:  map[string][]byte{},
	}
	// Each run: start, (define,) write the counter, STORE_VOLATILE, shut down.
	run := func(dir string, define bool, value uint64, args ...string) {
		p := startVTPM(t, f.home, dir, args...)
		tpm, err := p.dial(t)
		if err != nil {
			t.Fatal(err)
		}
		if define {
			if err := defineCounter(tpm); err != nil {
				t.Fatalf("NV_DefineSpace: %v", err)
			}
		}
		if err := writeCounter(tpm, value); err != nil {
			t.Fatalf("NV_Write: %v", err)
		}
		p.shutdown(t)
	}
	run(f.dirA, true, 1)
	for _, n := range permallSlots {
		f.old[n] = mustReadFile(t, filepath.Join(f.dirA, n))
	}
	run(f.dirA, false, 2)
	key, _ := tpmKeys(t, f.home, f.dirA)
	keyA := filepath.Join(base, "a.key")
	if err := key.WriteDataKeyFile(keyA); err != nil {
		t.Fatal(err)
	}
	run(f.dirB, true, 99, "--data-key", "file="+keyA)
	run(f.dirC, true, 98)
	f.uuidA, f.uuidB, f.uuidC = tpmUUID(t, f.dirA).String(), tpmUUID(t, f.dirB).String(), tpmUUID(t, f.dirC).String()
	return f
}

func mustReadFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustWriteFile(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// copyTree copies the regular files and directories under src to dst.
func copyTree(t testing.TB, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.MkdirAll(to, info.Mode().Perm())
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(to, b, info.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
}

type fileSnap struct {
	mode    fs.FileMode
	content string
}

// snapshotTree records every file and directory under root.
func snapshotTree(t testing.TB, root string) map[string]fileSnap {
	t.Helper()
	snap := map[string]fileSnap{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		s := fileSnap{mode: info.Mode()}
		if info.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			s.content = string(b)
		}
		snap[rel] = s
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

// diffSnapshots describes how after differs from before, or returns "".
func diffSnapshots(before, after map[string]fileSnap) string {
	var d []string
	for _, name := range slices.Sorted(maps.Keys(before)) {
		a, ok := after[name]
		switch {
		case !ok:
			d = append(d, name+" was deleted")
		case a.mode != before[name].mode:
			d = append(d, name+" changed mode from "+before[name].mode.String()+" to "+a.mode.String())
		case a.content != before[name].content:
			d = append(d, name+" was modified")
		}
	}
	for _, name := range slices.Sorted(maps.Keys(after)) {
		if _, ok := before[name]; !ok {
			d = append(d, name+" was created")
		}
	}
	return strings.Join(d, "; ")
}

func flipByte(t testing.TB, path string, off int) {
	t.Helper()
	b := mustReadFile(t, path)
	if off < 0 {
		off += len(b)
	}
	b[off] ^= 0x40
	mustWriteFile(t, path, b)
}

func truncateFile(t testing.TB, path string, n int64) {
	t.Helper()
	if err := os.Truncate(path, n); err != nil {
		t.Fatal(err)
	}
}

func swapFiles(t testing.TB, a, b string) {
	t.Helper()
	x, y := mustReadFile(t, a), mustReadFile(t, b)
	mustWriteFile(t, a, y)
	mustWriteFile(t, b, x)
}

// TestTamperedStateRefusesToStart damages, swaps or rolls back sealed state
// and checks that vtpm refuses to start with an error naming the file and the
// reason, and that it leaves every file exactly as it found it.
func TestTamperedStateRefusesToStart(t *testing.T) {
	f := manufactureTamperFixture(t)
	// Both slots of each blob exist: the fixture wrote each at least twice.
	const (
		permA = "permall.a.sealed"
		permB = "permall.b.sealed"
		volA  = "volatilestate.a.sealed"
		volB  = "volatilestate.b.sealed"
	)
	wrongKey := filepath.Join(t.TempDir(), "wrong.key")
	k := make([]byte, 32)
	rand.Read(k)
	mustWriteFile(t, wrongKey, []byte(hex.EncodeToString(k)))

	tests := []struct {
		name   string
		tamper func(t *testing.T, dir string)
		args   []string
		want   []string // substrings of the error output
	}{
		{
			name: "flipped ciphertext byte in both permall slots",
			tamper: func(t *testing.T, dir string) {
				flipByte(t, filepath.Join(dir, permA), -100)
				flipByte(t, filepath.Join(dir, permB), -100)
			},
			want: []string{"no copy verifies", permA + ": authentication failed", permB + ": authentication failed"},
		},
		{
			name: "flipped magic in both permall slots",
			tamper: func(t *testing.T, dir string) {
				flipByte(t, filepath.Join(dir, permA), 0)
				flipByte(t, filepath.Join(dir, permB), 0)
			},
			want: []string{permA + ": not a vtpm sealed file (bad magic)", permB + ": not a vtpm sealed file"},
		},
		{
			name: "flipped generation in the header of both permall slots",
			tamper: func(t *testing.T, dir string) {
				flipByte(t, filepath.Join(dir, permA), 19)
				flipByte(t, filepath.Join(dir, permB), 19)
			},
			want: []string{permA + ": authentication failed", permB + ": authentication failed"},
		},
		{
			name: "truncated permall slots",
			tamper: func(t *testing.T, dir string) {
				truncateFile(t, filepath.Join(dir, permA), 100)
				truncateFile(t, filepath.Join(dir, permB), 20)
			},
			want: []string{
				permA + ": truncated (100 bytes, the header announces",
				permB + ": truncated (20 bytes, shorter than the 52-byte header)",
			},
		},
		{
			name: "truncated volatilestate slots",
			tamper: func(t *testing.T, dir string) {
				truncateFile(t, filepath.Join(dir, volA), 2000)
				truncateFile(t, filepath.Join(dir, volB), 0)
			},
			want: []string{"load volatilestate", volA + ": truncated (2000 bytes", volB + ": truncated (0 bytes"},
		},
		{
			name: "permall of another TPM under the same data key",
			tamper: func(t *testing.T, dir string) {
				for _, n := range []string{permA, permB} {
					mustWriteFile(t, filepath.Join(dir, n), mustReadFile(t, filepath.Join(f.dirB, n)))
				}
			},
			want: []string{permA + ": holds state of TPM " + f.uuidB + ", this is TPM " + f.uuidA, permB + ": holds state of TPM " + f.uuidB},
		},
		{
			name: "permall of another TPM under its own key",
			tamper: func(t *testing.T, dir string) {
				for _, n := range []string{permA, permB} {
					mustWriteFile(t, filepath.Join(dir, n), mustReadFile(t, filepath.Join(f.dirC, n)))
				}
			},
			want: []string{permA + ": authentication failed", "its header names TPM " + f.uuidC + ", this is TPM " + f.uuidA},
		},
		{
			name: "permall and volatilestate swapped",
			tamper: func(t *testing.T, dir string) {
				swapFiles(t, filepath.Join(dir, permA), filepath.Join(dir, volA))
				swapFiles(t, filepath.Join(dir, permB), filepath.Join(dir, volB))
			},
			want: []string{permA + ": holds volatile state, expected permanent state", permB + ": holds volatile state"},
		},
		{
			name: "older generation put back",
			tamper: func(t *testing.T, dir string) {
				for n, b := range f.old {
					mustWriteFile(t, filepath.Join(dir, n), b)
				}
			},
			want: []string{".sealed is generation", "was seen last", "rollback", "--allow-rollback"},
		},
		{
			name: "permall deleted",
			tamper: func(t *testing.T, dir string) {
				for _, n := range []string{permA, permB} {
					if err := os.Remove(filepath.Join(dir, n)); err != nil {
						t.Fatal(err)
					}
				}
			},
			want: []string{permA + " and " + permB + " are missing", "--allow-rollback"},
		},
		{
			name: "vtpm-state.json deleted",
			tamper: func(t *testing.T, dir string) {
				if err := os.Remove(filepath.Join(dir, "vtpm-state.json")); err != nil {
					t.Fatal(err)
				}
			},
			want: []string{"vtpm-state.json is missing", "names TPM " + f.uuidA, "restore vtpm-state.json from backup"},
		},
		{
			// Written completely (its generation recorded at the clean
			// stop), then damaged: no crash explains it, and loading the
			// other slot would roll the TPM back.
			name: "newest permall slot damaged after a clean stop",
			tamper: func(t *testing.T, dir string) {
				flipByte(t, filepath.Join(dir, newestSlot(t, f.home, f.dirA)), -100)
			},
			want: []string{"does not verify", "authentication failed", "was recorded as written completely",
				"no write torn by a crash", "nothing was changed", "--allow-rollback"},
		},
		{
			name: "newest permall slot from another TPM",
			tamper: func(t *testing.T, dir string) {
				n := newestSlot(t, f.home, f.dirA)
				mustWriteFile(t, filepath.Join(dir, n), mustReadFile(t, filepath.Join(f.dirC, n)))
			},
			want: []string{"does not verify", "its header names TPM " + f.uuidC, "another TPM's state",
				"was recorded as written completely", "nothing was changed"},
		},
		{
			// The TPM's identity and state are gone, its key protector is
			// left: starting would make a fresh TPM. Nothing is written, and
			// no advice leads there silently.
			name: "state and vtpm-state.json deleted, protector.json left",
			tamper: func(t *testing.T, dir string) {
				entries, _ := os.ReadDir(dir)
				for _, e := range entries {
					if n := e.Name(); n == "vtpm-state.json" || strings.HasSuffix(n, ".sealed") {
						if err := os.Remove(filepath.Join(dir, n)); err != nil {
							t.Fatal(err)
						}
					}
				}
			},
			want: []string{"held TPM " + f.uuidA, "protector.json is there", "vtpm-state.json", "is missing", "nothing was changed",
				"restore the TPM's state directory"},
		},
		{
			name:   "wrong data key",
			tamper: func(*testing.T, string) {},
			args:   []string{"--data-key", "file=" + wrongKey},
			want:   []string{permA + ": authentication failed (wrong data key", permB + ": authentication failed"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			home, dir := filepath.Join(t.TempDir(), "home"), filepath.Join(t.TempDir(), "a")
			copyTree(t, f.home, home)
			copyTree(t, f.dirA, dir)
			tc.tamper(t, dir)
			beforeDir, beforeHome := snapshotTree(t, dir), snapshotTree(t, home)

			p := startVTPM(t, home, dir, tc.args...)
			code, out := p.wait(t)
			if code <= 0 {
				t.Errorf("vtpm exited with %d, want a failure exit code; output:\n%s", code, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			// No way out offered may lead to a fresh TPM without a word.
			for _, bad := range []string{"remove " + keybroker.ProtectorFile, "delete " + keybroker.ProtectorFile} {
				if strings.Contains(out, bad) {
					t.Errorf("output advises to %q:\n%s", bad, out)
				}
			}
			if d := diffSnapshots(beforeDir, snapshotTree(t, dir)); d != "" {
				t.Errorf("refusing to start changed the state directory: %s", d)
			}
			if d := diffSnapshots(beforeHome, snapshotTree(t, home)); d != "" {
				t.Errorf("refusing to start changed the data root: %s", d)
			}
		})
	}
}

// TestTamperedStateRecovers covers the tampering vtpm may survive: a damaged
// newest copy with a good previous one, and an older generation restored
// deliberately with --allow-rollback.
func TestTamperedStateRecovers(t *testing.T) {
	f := manufactureTamperFixture(t)
	tests := []struct {
		name   string
		tamper func(t *testing.T, home, dir string) (warn []string) // also expected in the warnings
		args   []string
		want   uint64   // counter value served
		orOld  bool     // or, as well, the value before the last write (1)
		warn   []string // substrings of the warnings printed
	}{
		{
			// What a crash in the middle of writing the next generation
			// leaves: the slot being written (not the newest) torn, its
			// generation never recorded. The newest complete copy is used.
			name: "slot torn by a crash in mid-write",
			tamper: func(t *testing.T, home, dir string) []string {
				newest := newestSlot(t, home, dir)
				torn := permallSlots[0]
				if torn == newest {
					torn = permallSlots[1]
				}
				flipByte(t, filepath.Join(dir, torn), -100)
				return []string{torn + ": authentication failed"}
			},
			want: 2,
			warn: []string{"a copy of TPM state does not verify (normal after a crash during a write)"},
		},
		{
			// A damaged newest slot is refused (TestTamperedStateRefusesToStart);
			// --allow-rollback loads the other slot and keeps the damaged
			// file, moved aside rather than written over.
			name: "newest slot damaged after a clean stop, --allow-rollback",
			tamper: func(t *testing.T, home, dir string) []string {
				newest := newestSlot(t, home, dir)
				flipByte(t, filepath.Join(dir, newest), -100)
				t.Cleanup(func() {
					kept, _ := filepath.Glob(filepath.Join(dir, newest+".damaged-*"))
					if len(kept) != 1 {
						t.Errorf("the damaged %s is kept as %v, want one file moved aside", newest, kept)
					}
				})
				return []string{newest, "moved aside"}
			},
			// The other slot holds the state before the last write of
			// permall: the counter's (1), or an orderly shutdown's (2).
			args:  []string{"--allow-rollback"},
			want:  2,
			orOld: true,
			warn:  []string{"no crash explains it"},
		},
		{
			// The record deleted: the TPM starts, loudly, and the host
			// remembers it for `doctor`.
			name: "generation record deleted",
			tamper: func(t *testing.T, home, dir string) []string {
				id := tpmUUID(t, dir)
				if err := os.Remove(filepath.Join(home, "keystore", "generations", id.String())); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					h, err := keybroker.Open(home, keystore.Options{})
					if err != nil {
						t.Fatal(err)
					}
					defer h.Close()
					resets, err := h.RollbackResets()
					if err != nil || len(resets) != 1 || resets[0].TPM != id {
						t.Errorf("RollbackResets = %+v, %v; want TPM %s listed", resets, err, id)
					}
				})
				return []string{"ROLLBACK PROTECTION WAS RESET for TPM " + id.String()}
			},
			want: 2,
		},
		{
			name: "older generation with --allow-rollback",
			tamper: func(t *testing.T, home, dir string) []string {
				for n, b := range f.old {
					mustWriteFile(t, filepath.Join(dir, n), b)
				}
				return nil
			},
			args: []string{"--allow-rollback"},
			want: 1,
			warn: []string{"loading an older generation of TPM state (--allow-rollback)"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			home, dir := filepath.Join(t.TempDir(), "home"), filepath.Join(t.TempDir(), "a")
			copyTree(t, f.home, home)
			copyTree(t, f.dirA, dir)
			warn := append(tc.tamper(t, home, dir), tc.warn...)

			p := startVTPM(t, home, dir, tc.args...)
			tpm, err := p.dial(t)
			if err != nil {
				t.Fatal(err)
			}
			v, err := readCounter(tpm)
			if err != nil {
				p.cmd.Process.Kill()
				_, out := p.wait(t)
				t.Fatalf("reading the counter: %v; output:\n%s", err, out)
			}
			out := p.shutdown(t)
			if v != tc.want && !(tc.orOld && v == 1) {
				t.Errorf("counter = %d, want %d", v, tc.want)
			}
			for _, w := range warn {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

// newestSlot returns the permall slot holding the newest generation.
func newestSlot(t *testing.T, home, dir string) string {
	t.Helper()
	key, _ := tpmKeys(t, home, dir)
	id := tpmUUID(t, dir)
	best, bestGen := "", uint64(0)
	for _, n := range permallSlots {
		if gen, err := unsealFile(key, id, "permall", filepath.Join(dir, n)); err == nil && gen > bestGen {
			best, bestGen = n, gen
		}
	}
	if best == "" {
		t.Fatalf("no permall slot in %s verifies", dir)
	}
	return best
}

// TestUnopenableTPMLeavesNoRecord: a TPM this host holds no key for is
// refused before its generation record is created, so the refusal neither
// starts rollback protection over for it nor reports a reset.
func TestUnopenableTPMLeavesNoRecord(t *testing.T) {
	f := manufactureTamperFixture(t)
	home, dir := filepath.Join(t.TempDir(), "other-host"), filepath.Join(t.TempDir(), "a")
	copyTree(t, f.dirA, dir)
	before := snapshotTree(t, dir)
	p := startVTPM(t, home, dir)
	code, out := p.wait(t)
	if code <= 0 || !strings.Contains(out, "cannot be opened on this host") {
		t.Fatalf("vtpm on another host's TPM exited with %d, want a refusal; output:\n%s", code, out)
	}
	if strings.Contains(out, "ROLLBACK PROTECTION WAS RESET") {
		t.Errorf("the refusal reported a reset of rollback protection:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(home, "keystore", "generations", f.uuidA)); err == nil {
		t.Error("the refused start created the TPM's generation record")
	}
	if d := diffSnapshots(before, snapshotTree(t, dir)); d != "" {
		t.Errorf("refusing to start changed the state directory: %s", d)
	}
}
