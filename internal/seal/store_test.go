package seal

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type env struct {
	dir  string
	gens *FileGenerations
	logs *syncBuffer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	root := t.TempDir()
	return &env{
		dir:  filepath.Join(root, "tpm"),
		gens: NewFileGenerations(filepath.Join(root, "generations")),
		logs: &syncBuffer{},
	}
}

func (e *env) open(t *testing.T, mod func(*Options)) *Store {
	t.Helper()
	opts := Options{Key: testKey, Generations: e.gens, Logger: slog.New(slog.NewTextHandler(e.logs, nil))}
	if mod != nil {
		mod(&opts)
	}
	s, err := Open(e.dir, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mustStore(t *testing.T, s *Store, name, data string) {
	t.Helper()
	if err := s.Store(name, []byte(data)); err != nil {
		t.Fatalf("Store(%s): %v", name, err)
	}
}

// snapshot returns every file under root (state dir and generation records).
func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		out[p] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func equalSnapshots(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// slotFile names slot 0 or 1 of blob name.
func slotFile(name string, slot int) string {
	return name + "." + slotLetters[slot] + ".sealed"
}

// readCopy unseals one file in the state directory.
func readCopy(t *testing.T, e *env, id uuid.UUID, name, file string) (string, uint64, error) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.dir, file))
	if err != nil {
		return "", 0, err
	}
	p, g, err := Unseal(testKey, id, name, b)
	return string(p), g, err
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

func TestStoreRoundTrip(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	if !Exists(e.dir) {
		t.Fatal("Exists = false after Open")
	}
	for i, data := range []string{"one", "two", "three"} {
		mustStore(t, s, "permall", data)
		mustStore(t, s, "volatilestate", "v-"+data)
		got, err := s.Load("permall")
		if err != nil || string(got) != data {
			t.Fatalf("Load = %q, %v; want %q", got, err, data)
		}
		if g, err := s.Generation("permall"); err != nil || g != uint64(i+1) {
			t.Fatalf("Generation = %d, %v; want %d", g, err, i+1)
		}
	}
	if _, err := s.Load("savestate"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load(savestate) = %v, want fs.ErrNotExist", err)
	}
	states, err := s.States()
	if err != nil {
		t.Fatal(err)
	}
	want := []StateInfo{{"permall", 5}, {"volatilestate", 7}}
	if len(states) != len(want) || states[0] != want[0] || states[1] != want[1] {
		t.Fatalf("States = %v, want %v", states, want)
	}
	// Generations 1 and 3 went to slot a, 2 to slot b.
	for _, c := range []struct {
		file string
		data string
		gen  uint64
	}{{"permall.a.sealed", "three", 3}, {"permall.b.sealed", "two", 2}} {
		if p, g, err := readCopy(t, e, s.UUID(), "permall", c.file); err != nil || g != c.gen || p != c.data {
			t.Errorf("%s = (%q, %d, %v), want generation %d %q", c.file, p, g, err, c.gen, c.data)
		}
	}
	for _, f := range []string{StateFileName, "permall.a.sealed", "permall.b.sealed"} {
		st, err := os.Stat(filepath.Join(e.dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode = %v, want 0600", f, st.Mode().Perm())
		}
	}
	var sf stateFile
	b, _ := os.ReadFile(filepath.Join(e.dir, StateFileName))
	if err := json.Unmarshal(b, &sf); err != nil || sf.Format != 1 || sf.UUID != s.UUID().String() {
		t.Errorf("%s = %s (%v), want format 1 and uuid %s", StateFileName, b, err, s.UUID())
	}

	// Close records the newest generation written.
	id := s.UUID()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if last, _ := e.gens.Last(id, "permall"); last != 3 {
		t.Errorf("recorded generation after Close = %d, want 3", last)
	}

	// Reopening keeps the UUID and the state, and generations keep growing.
	s2 := e.open(t, func(o *Options) { o.FileMode = 0o640 })
	if s2.UUID() != id {
		t.Fatalf("UUID changed across Open: %s -> %s", id, s2.UUID())
	}
	mustStore(t, s2, "permall", "four")
	if g, _ := s2.Generation("permall"); g != 4 {
		t.Errorf("generation after reopen = %d, want 4", g)
	}
	if p, g, err := readCopy(t, e, id, "permall", "permall.b.sealed"); err != nil || g != 4 || p != "four" {
		t.Errorf("permall.b.sealed after reopen = (%q, %d, %v), want generation 4", p, g, err)
	}
	if st, _ := os.Stat(filepath.Join(e.dir, "permall.b.sealed")); st.Mode().Perm() != 0o640 {
		t.Errorf("mode with FileMode 0640 = %v", st.Mode().Perm())
	}
}

// TestWritesInPlace checks the write pattern: slots alternate, each is
// rewritten in place (same inode, nothing else appears in the directory),
// a shorter record truncates the slot, and a write never touches the slot
// holding the newest copy.
func TestWritesInPlace(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	data := []string{"a long first record", "two", "3", "four, longer again", "five"}
	inodes := map[string]uint64{}
	for i, d := range data {
		slot := i % 2
		other := filepath.Join(e.dir, slotFile("permall", 1-slot))
		otherBefore, _ := os.ReadFile(other)
		mustStore(t, s, "permall", d)
		path := filepath.Join(e.dir, slotFile("permall", slot))
		if ino, ok := inodes[path]; ok && ino != inode(t, path) {
			t.Errorf("write %d replaced %s (new inode) instead of writing it in place", i+1, filepath.Base(path))
		}
		inodes[path] = inode(t, path)
		if p, g, err := readCopy(t, e, s.UUID(), "permall", filepath.Base(path)); err != nil || g != uint64(i+1) || p != d {
			t.Errorf("write %d: %s = (%q, %d, %v), want generation %d %q", i+1, filepath.Base(path), p, g, err, i+1, d)
		}
		if otherAfter, _ := os.ReadFile(other); !bytes.Equal(otherBefore, otherAfter) {
			t.Errorf("write %d changed %s, which held the newest copy", i+1, filepath.Base(other))
		}
	}
	entries, _ := os.ReadDir(e.dir)
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	wantNames := []string{LockName, "permall.a.sealed", "permall.b.sealed", StateFileName}
	if !slices.Equal(names, wantNames) {
		t.Errorf("directory holds %v, want %v", names, wantNames)
	}
}

// countDirSyncs counts syncDir calls until the test ends. Stores under
// test must have no Generations: its recorder would fsync concurrently.
func countDirSyncs(t *testing.T) *int {
	t.Helper()
	n := new(int)
	orig := syncDir
	syncDir = func(dir string) error { *n++; return orig(dir) }
	t.Cleanup(func() { syncDir = orig })
	return n
}

func TestDirectoryFsyncs(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, func(o *Options) { o.Generations = nil })
	syncs := countDirSyncs(t)
	steps := []struct {
		what string
		do   func() error
		want int // directory fsyncs
	}{
		{"first write creates slot a", func() error { return s.Store("permall", []byte("1")) }, 1},
		{"second write creates slot b", func() error { return s.Store("permall", []byte("2")) }, 1},
		{"third write is in place", func() error { return s.Store("permall", []byte("3")) }, 0},
		{"fourth write is in place", func() error { return s.Store("permall", []byte("4")) }, 0},
		{"deleting a missing blob removes nothing", func() error { return s.Delete("savestate", false) }, 0},
		{"deleting a blob", func() error { return s.Delete("permall", true) }, 1},
		{"deleting it again removes nothing", func() error { return s.Delete("permall", false) }, 0},
	}
	for _, st := range steps {
		*syncs = 0
		if err := st.do(); err != nil {
			t.Fatalf("%s: %v", st.what, err)
		}
		if *syncs != st.want {
			t.Errorf("%s: %d directory fsyncs, want %d", st.what, *syncs, st.want)
		}
	}
}

func TestDelete(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "volatilestate", "a")
	mustStore(t, s, "volatilestate", "b")
	for _, f := range []string{"volatilestate.sealed", "volatilestate.sealed.prev", "volatilestate.sealed.tmp"} {
		os.WriteFile(filepath.Join(e.dir, f), []byte("legacy"), 0o600)
	}
	if err := s.Delete("volatilestate", true); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"volatilestate.a.sealed", "volatilestate.b.sealed", "volatilestate.sealed", "volatilestate.sealed.prev", "volatilestate.sealed.tmp"} {
		if _, err := os.Stat(filepath.Join(e.dir, f)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still exists after Delete", f)
		}
	}
	if _, err := s.Load("volatilestate"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load after Delete = %v, want fs.ErrNotExist", err)
	}
	if err := s.Delete("volatilestate", false); err != nil {
		t.Errorf("Delete(mustExist=false) of a missing blob = %v", err)
	}
	if err := s.Delete("volatilestate", true); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Delete(mustExist=true) of a missing blob = %v, want fs.ErrNotExist", err)
	}
	// A new copy after a delete still outgrows the generations seen.
	mustStore(t, s, "volatilestate", "c")
	if g, _ := s.Generation("volatilestate"); g != 3 {
		t.Errorf("generation after delete and store = %d, want 3", g)
	}
}

func TestLoadTamper(t *testing.T) {
	type setup struct {
		e    *env
		path string // permall.b.sealed, the newest copy
	}
	copyFrom := func(t *testing.T, src, dst string) {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	modify := func(f func([]byte) []byte) func(*testing.T, setup) {
		return func(t *testing.T, st setup) {
			b, _ := os.ReadFile(st.path)
			if err := os.WriteFile(st.path, f(b), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	flipAt := func(i func(n int) int) func(*testing.T, setup) {
		return modify(func(b []byte) []byte { b[i(len(b))] ^= 0x80; return b })
	}
	tests := []struct {
		name    string
		tamper  func(*testing.T, setup)
		opts    func(*Options)
		want    error
		message []string
		remedy  string // a remedy the error offers, as prose
	}{
		{
			name:    "flipped header byte",
			tamper:  flipAt(func(int) int { return 15 }),
			want:    ErrAuth,
			message: []string{"no copy verifies", "permall.b.sealed: authentication failed (wrong data key, or the file was modified)"},
		},
		{
			name:    "flipped ciphertext byte",
			tamper:  flipAt(func(int) int { return headerLen }),
			want:    ErrAuth,
			message: []string{"permall.b.sealed: authentication failed"},
		},
		{
			name:    "flipped tag byte",
			tamper:  flipAt(func(n int) int { return n - 3 }),
			want:    ErrAuth,
			message: []string{"permall.b.sealed: authentication failed"},
		},
		{
			name:    "truncated",
			tamper:  modify(func(b []byte) []byte { return b[:len(b)-10] }),
			want:    ErrTruncated,
			message: []string{"permall.b.sealed: truncated"},
		},
		{
			name: "blob from another TPM",
			tamper: func(t *testing.T, st setup) {
				other := &env{dir: filepath.Join(t.TempDir(), "other"), gens: st.e.gens, logs: st.e.logs}
				o := other.open(t, nil)
				mustStore(t, o, "permall", "other TPM's state")
				o.Close() // its generation is recorded before the snapshot
				copyFrom(t, filepath.Join(other.dir, "permall.a.sealed"), st.path)
			},
			want:    ErrWrongTPM,
			message: []string{"permall.b.sealed: holds state of TPM ", ", this is TPM "},
		},
		{
			name: "volatilestate put in place of permall",
			tamper: func(t *testing.T, st setup) {
				copyFrom(t, filepath.Join(st.e.dir, "volatilestate.a.sealed"), st.path)
			},
			want:    ErrWrongType,
			message: []string{"permall.b.sealed: holds volatile state, expected permanent state"},
		},
		{
			name: "older generation put back",
			tamper: func(t *testing.T, st setup) {
				copyFrom(t, filepath.Join(st.e.dir, "old-permall"), st.path)
			},
			want:    ErrRollback,
			message: []string{"permall.b.sealed is generation 1, but generation 2"},
			remedy:  "pass --allow-rollback to restore an older copy deliberately",
		},
		{
			name:    "wrong key",
			tamper:  func(*testing.T, setup) {},
			opts:    func(o *Options) { o.Key = otherKey },
			want:    ErrAuth,
			message: []string{"permall.b.sealed: authentication failed (wrong data key"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			s := e.open(t, nil)
			mustStore(t, s, "permall", "generation one")
			b, _ := os.ReadFile(filepath.Join(e.dir, "permall.a.sealed"))
			os.WriteFile(filepath.Join(e.dir, "old-permall"), b, 0o600)
			mustStore(t, s, "permall", "generation two")
			mustStore(t, s, "volatilestate", "volatile")
			s.Close()
			// Without the older slot the failure cannot be papered over.
			os.Remove(filepath.Join(e.dir, "permall.a.sealed"))
			tt.tamper(t, setup{e: e, path: filepath.Join(e.dir, "permall.b.sealed")})

			before := snapshot(t, filepath.Dir(e.dir))
			s2 := e.open(t, tt.opts)
			got, err := s2.Load("permall")
			if !errors.Is(err, tt.want) {
				t.Fatalf("Load = (%q, %v), want %v", got, err, tt.want)
			}
			for _, m := range tt.message {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %q", err, m)
				}
			}
			if tt.remedy != "" && !slices.ContainsFunc(errdefs.Remedies(err), errdefs.Advise("%s", tt.remedy).Equal) {
				t.Errorf("error %q does not offer the remedy %q: %+v", err, tt.remedy, errdefs.Remedies(err))
			}
			if k := errdefs.KindOf(err); k != errdefs.ErrDataLoss {
				t.Errorf("error %q is of kind %v, want %v", err, k, errdefs.ErrDataLoss)
			}
			for _, other := range []error{ErrAuth, ErrTruncated, ErrWrongTPM, ErrWrongType, ErrRollback} {
				if other != tt.want && errors.Is(err, other) {
					t.Errorf("error %q also matches %v; errors must be distinct", err, other)
				}
			}
			s2.Close()
			if after := snapshot(t, filepath.Dir(e.dir)); !equalSnapshots(before, after) {
				t.Errorf("a failed Load changed files on disk")
			}
		})
	}
}

func TestRollbackAllowed(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "permall", "one")
	old, _ := os.ReadFile(filepath.Join(e.dir, "permall.a.sealed"))
	mustStore(t, s, "permall", "two")
	mustStore(t, s, "permall", "three")
	s.Close()
	os.WriteFile(filepath.Join(e.dir, "permall.a.sealed"), old, 0o600)
	os.Remove(filepath.Join(e.dir, "permall.b.sealed"))

	s2 := e.open(t, nil)
	if _, err := s2.Load("permall"); !errors.Is(err, ErrRollback) {
		t.Fatalf("Load without AllowRollback = %v, want ErrRollback", err)
	}
	s2.Close()
	s3 := e.open(t, func(o *Options) { o.AllowRollback = true })
	got, err := s3.Load("permall")
	if err != nil || string(got) != "one" {
		t.Fatalf("Load with AllowRollback = %q, %v; want \"one\"", got, err)
	}
	if !strings.Contains(e.logs.String(), "older generation") {
		t.Errorf("no warning logged for a deliberate rollback: %s", e.logs)
	}
	// The next write must still outgrow everything seen.
	mustStore(t, s3, "permall", "four")
	if g, _ := s3.Generation("permall"); g != 4 {
		t.Errorf("generation after rollback and store = %d, want 4", g)
	}
}

func TestMissingPermallWithHistory(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "permall", "one")
	mustStore(t, s, "permall", "two")
	s.Close()
	os.Remove(filepath.Join(e.dir, "permall.a.sealed"))
	os.Remove(filepath.Join(e.dir, "permall.b.sealed"))

	s2 := e.open(t, nil)
	_, err := s2.Load("permall")
	if !errors.Is(err, ErrRollback) || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load of deleted permall = %v, want ErrRollback (not fs.ErrNotExist)", err)
	} else if !strings.Contains(err.Error(), "permall.a.sealed and permall.b.sealed are missing") {
		t.Errorf("error %q does not name the missing slots", err)
	}
	s2.Close()
	s3 := e.open(t, func(o *Options) { o.AllowRollback = true })
	if _, err := s3.Load("permall"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load with AllowRollback = %v, want fs.ErrNotExist", err)
	}
}

// TestDamagedSlot covers the second slot's purpose: a newest copy torn by
// a crash in the middle of a write (its generation never recorded) falls
// back one generation, with a warning naming it; an older copy that does
// not verify is named too, never silently skipped. A newest copy damaged
// after it was written completely, or one naming another TPM, is no crash:
// the load is refused with the reasons and nothing changes on disk, and
// --allow-rollback moves the damaged file aside rather than writing over it.
func TestDamagedSlot(t *testing.T) {
	corrupt := func(b []byte) []byte { b[len(b)-1] ^= 1; return b }
	truncate := func(b []byte) []byte { return b[:len(b)/2] }
	foreign := func(b []byte) []byte { id := uuid.New(); copy(b[20:36], id[:]); return b }
	// After "one", "two", "three": slot a holds 3 (newest), slot b holds 2.
	tests := []struct {
		name       string
		a, b       func([]byte) []byte // nil: leave alone
		removeA    bool
		crash      bool   // the third write was never recorded (a crash came first)
		allow      bool   // --allow-rollback
		want       string // loaded content; "" means an error
		wantErr    error
		errText    []string
		warnFile   string // a warning must name this file
		movedAside bool   // the damaged slot a is kept under another name
		storeAfter bool
	}{
		{name: "corrupt newest after a crash", a: corrupt, crash: true, want: "two", warnFile: "permall.a.sealed", storeAfter: true},
		{name: "torn newest after a crash", a: truncate, crash: true, want: "two", warnFile: "permall.a.sealed", storeAfter: true},
		{
			name: "corrupt newest after a clean stop", a: corrupt, wantErr: ErrRollback,
			errText: []string{"permall.a.sealed", "authentication failed", "generation 3 was recorded as written completely", "no write torn by a crash"},
		},
		{
			name: "torn newest after a clean stop", a: truncate, wantErr: ErrRollback,
			errText: []string{"permall.a.sealed", "truncated", "generation 3 was recorded"},
		},
		{
			name: "newest names another TPM", a: foreign, crash: true, wantErr: errdefs.ErrDataLoss,
			errText: []string{"permall.a.sealed", "its header names TPM", "another TPM's state"},
		},
		{
			name: "both reasons", a: foreign, wantErr: ErrRollback,
			errText: []string{"generation 3 was recorded", "another TPM's state"},
		},
		{
			name: "corrupt newest after a clean stop, --allow-rollback", a: corrupt, allow: true, want: "two",
			warnFile: "permall.a.sealed", movedAside: true, storeAfter: true,
		},
		{name: "corrupt older", b: corrupt, want: "three", warnFile: "permall.b.sealed"},
		{name: "torn older", b: truncate, want: "three", warnFile: "permall.b.sealed"},
		{
			// A missing slot is no crash state a write can leave once
			// the blob has history: both slots exist after two writes.
			name: "missing newest", removeA: true, wantErr: ErrRollback,
			errText: []string{"permall.b.sealed is generation 2, but generation 3"},
		},
		{
			name: "both damaged", a: corrupt, b: truncate, wantErr: ErrAuth,
			errText: []string{"no copy verifies", "permall.a.sealed: authentication failed", "permall.b.sealed: truncated"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			s := e.open(t, nil)
			mustStore(t, s, "permall", "one")
			mustStore(t, s, "permall", "two")
			s.Close()
			s = e.open(t, func(o *Options) {
				if tt.crash {
					o.Generations = nil
				}
			})
			mustStore(t, s, "permall", "three")
			s.Close()
			a, b := filepath.Join(e.dir, "permall.a.sealed"), filepath.Join(e.dir, "permall.b.sealed")
			damagedA, _ := os.ReadFile(a)
			for _, c := range []struct {
				path string
				f    func([]byte) []byte
			}{{a, tt.a}, {b, tt.b}} {
				if c.f != nil {
					data, _ := os.ReadFile(c.path)
					data = c.f(data)
					os.WriteFile(c.path, data, 0o600)
					if c.path == a {
						damagedA = data
					}
				}
			}
			if tt.removeA {
				os.Remove(a)
			}
			before := snapshot(t, filepath.Dir(e.dir))
			s2 := e.open(t, func(o *Options) { o.AllowRollback = tt.allow })
			got, err := s2.Load("permall")
			if tt.want == "" {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Load = (%q, %v), want %v", got, err, tt.wantErr)
				}
				for _, m := range tt.errText {
					if !strings.Contains(err.Error(), m) {
						t.Errorf("error %q does not mention %q", err, m)
					}
				}
				if after := snapshot(t, filepath.Dir(e.dir)); !equalSnapshots(before, after) {
					t.Errorf("a failed Load changed files on disk")
				}
				return
			}
			if err != nil || string(got) != tt.want {
				t.Fatalf("Load = %q, %v; want %q", got, err, tt.want)
			}
			logs := e.logs.String()
			if !strings.Contains(logs, "level=WARN") || !strings.Contains(logs, tt.warnFile) {
				t.Errorf("no warning naming %s was logged: %s", tt.warnFile, logs)
			}
			if tt.movedAside {
				kept, _ := filepath.Glob(a + ".damaged-*")
				if len(kept) != 1 {
					t.Fatalf("damaged slot kept as %v, want one file moved aside", kept)
				}
				if data, _ := os.ReadFile(kept[0]); !bytes.Equal(data, damagedA) {
					t.Errorf("%s does not hold the damaged copy", kept[0])
				}
			}
			if !tt.storeAfter {
				return
			}
			// The damaged newest copy is overwritten (or was moved aside), the good one kept.
			mustStore(t, s2, "permall", "four")
			if p, g, err := readCopy(t, e, s2.UUID(), "permall", "permall.b.sealed"); err != nil || p != "two" || g != 2 {
				t.Errorf("permall.b.sealed after store = (%q, %d, %v), want generation 2 \"two\" kept", p, g, err)
			}
			if p, g, err := readCopy(t, e, s2.UUID(), "permall", "permall.a.sealed"); err != nil || p != "four" || g < 3 {
				t.Errorf("permall.a.sealed after store = (%q, %d, %v), want \"four\"", p, g, err)
			}
		})
	}
}

// TestUnusableSlot: a slot this process may not read or write is not
// damage to skip; the load fails naming the file and the permission.
func TestUnusableSlot(t *testing.T) {
	if os.Geteuid() == 0 {
		// Root reads and writes every file: run this test as nobody.
		runAsNobody(t, "TestUnusableSlot")
		return
	}
	for _, mode := range []os.FileMode{0o000, 0o400} {
		t.Run(fmt.Sprintf("%04o", mode), func(t *testing.T) {
			e := newEnv(t)
			s := e.open(t, nil)
			mustStore(t, s, "permall", "one")
			mustStore(t, s, "permall", "two")
			s.Close()
			a := filepath.Join(e.dir, "permall.a.sealed")
			os.Chmod(a, mode)
			defer os.Chmod(a, 0o600)
			s2 := e.open(t, nil)
			_, err := s2.Load("permall")
			if !errors.Is(err, errdefs.ErrPermissionDenied) || !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), "permall.a.sealed") {
				t.Fatalf("Load = %v; want permission denied naming permall.a.sealed", err)
			}
		})
	}
}

// runAsNobody runs test in a copy of this test binary as uid/gid 65534,
// with a temporary directory of its own, and fails with its output if it
// fails (or is skipped).
func runAsNobody(t *testing.T, test string) {
	t.Helper()
	if os.Getenv("VTPM_TEST_AS_NOBODY") != "" {
		t.Fatal("still root after the change to nobody")
	}
	dir, err := os.MkdirTemp("", "vtpm-seal-nobody")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "seal.test")
	if err := os.WriteFile(exe, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^"+test+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "VTPM_TEST_AS_NOBODY=1", "TMPDIR="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: "+test) {
		t.Fatalf("%s as nobody: %v\n%s", test, err, out)
	}
}

func TestOldPairPutBackIsRollback(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	files := map[uint64][]byte{}
	for i, d := range []string{"one", "two", "three", "four"} {
		mustStore(t, s, "permall", d)
		files[uint64(i+1)], _ = os.ReadFile(filepath.Join(e.dir, slotFile("permall", i%2)))
	}
	s.Close()
	tests := []struct {
		name string
		a, b []byte
	}{
		// A damaged slot must not unlock a copy more than one generation back.
		{"garbage beside generation 2", []byte("garbage"), files[2]},
		// Two genuine copies, one generation back: no damage explains it.
		{"intact generations 3 and 2", files[3], files[2]},
		{"intact generations 1 and 2", files[1], files[2]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			os.WriteFile(filepath.Join(e.dir, "permall.a.sealed"), tt.a, 0o600)
			os.WriteFile(filepath.Join(e.dir, "permall.b.sealed"), tt.b, 0o600)
			s2 := e.open(t, nil)
			defer s2.Close()
			if _, err := s2.Load("permall"); !errors.Is(err, ErrRollback) {
				t.Errorf("Load = %v, want ErrRollback", err)
			}
		})
	}
}

// legacyEnv makes a state directory in the layout before slots:
// permall.sealed at generation 2 (data "two"), permall.sealed.prev at 1
// ("one"), and a leftover temporary file. Generation 2 is recorded.
func legacyEnv(t *testing.T) (*env, uuid.UUID) {
	t.Helper()
	e := newEnv(t)
	s := e.open(t, nil)
	id := s.UUID()
	s.Close()
	for _, f := range []struct {
		file string
		gen  uint64
		data string
	}{{"permall.sealed", 2, "two"}, {"permall.sealed.prev", 1, "one"}, {"permall.sealed.tmp", 3, "unfinished"}} {
		b, err := Seal(testKey, id, "permall", f.gen, []byte(f.data))
		if err != nil {
			t.Fatal(err)
		}
		if f.file == "permall.sealed.tmp" {
			b = b[:len(b)/2]
		}
		if err := os.WriteFile(filepath.Join(e.dir, f.file), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.gens.Record(id, "permall", 2); err != nil {
		t.Fatal(err)
	}
	return e, id
}

func TestLegacyLayout(t *testing.T) {
	t.Run("read without changes, migrate on first write", func(t *testing.T) {
		e, id := legacyEnv(t)
		if !HasBlobs(e.dir) {
			t.Error("HasBlobs = false for a legacy layout")
		}
		if st, err := ListStates(e.dir); err != nil || len(st) != 1 || st[0] != (StateInfo{"permall", 3}) {
			t.Errorf("ListStates = %v, %v; want permall of 3 bytes", st, err)
		}
		before := snapshot(t, filepath.Dir(e.dir))
		s := e.open(t, nil)
		got, err := s.Load("permall")
		if err != nil || string(got) != "two" {
			t.Fatalf("Load = %q, %v; want \"two\"", got, err)
		}
		if after := snapshot(t, filepath.Dir(e.dir)); !equalSnapshots(before, after) {
			t.Errorf("Load changed files on disk")
		}
		mustStore(t, s, "permall", "three")
		entries, _ := os.ReadDir(e.dir)
		for _, en := range entries {
			if strings.HasPrefix(en.Name(), "permall.sealed") {
				t.Errorf("%s is left after the first write", en.Name())
			}
		}
		// The legacy newest copy became slot a; slot b (the legacy previous
		// copy) took the new generation.
		for _, c := range []struct {
			file, data string
			gen        uint64
		}{{"permall.a.sealed", "two", 2}, {"permall.b.sealed", "three", 3}} {
			if p, g, err := readCopy(t, e, id, "permall", c.file); err != nil || p != c.data || g != c.gen {
				t.Errorf("%s = (%q, %d, %v), want generation %d %q", c.file, p, g, err, c.gen, c.data)
			}
		}
		mustStore(t, s, "permall", "four")
		if got, err := s.Load("permall"); err != nil || string(got) != "four" {
			t.Errorf("Load after two writes = %q, %v; want \"four\"", got, err)
		}
	})
	// Legacy copies were replaced by rename, which no crash tears: a
	// damaged newest copy is refused, and --allow-rollback keeps it aside.
	t.Run("damaged newest is refused", func(t *testing.T) {
		e, _ := legacyEnv(t)
		cur := filepath.Join(e.dir, "permall.sealed")
		b, _ := os.ReadFile(cur)
		os.WriteFile(cur, b[:40], 0o600)
		before := snapshot(t, filepath.Dir(e.dir))
		s := e.open(t, nil)
		if got, err := s.Load("permall"); !errors.Is(err, ErrRollback) || !strings.Contains(err.Error(), "permall.sealed") {
			t.Fatalf("Load = %q, %v; want a refusal naming permall.sealed", got, err)
		}
		if after := snapshot(t, filepath.Dir(e.dir)); !equalSnapshots(before, after) {
			t.Errorf("a refused Load changed files on disk")
		}
		s.Close()
		s = e.open(t, func(o *Options) { o.AllowRollback = true })
		got, err := s.Load("permall")
		if err != nil || string(got) != "one" {
			t.Fatalf("Load with AllowRollback = %q, %v; want \"one\"", got, err)
		}
		if !strings.Contains(e.logs.String(), "permall.sealed: truncated") {
			t.Errorf("no warning naming the damaged permall.sealed: %s", e.logs)
		}
		mustStore(t, s, "permall", "three")
		if got, err := s.Load("permall"); err != nil || string(got) != "three" {
			t.Errorf("Load after the first write = %q, %v; want \"three\"", got, err)
		}
		if kept, _ := filepath.Glob(cur + ".damaged-*"); len(kept) != 1 {
			t.Errorf("damaged copy kept as %v, want one file moved aside", kept)
		}
	})
}

func TestStoreAfterSlotRemoved(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "savestate", "one")
	mustStore(t, s, "savestate", "two")
	// Removed behind the store's back, under its lock: outside the crash
	// model, but a write must still succeed and be what is read.
	os.Remove(filepath.Join(e.dir, "savestate.b.sealed"))
	mustStore(t, s, "savestate", "three")
	if got, err := s.Load("savestate"); err != nil || string(got) != "three" {
		t.Fatalf("Load = %q, %v; want \"three\"", got, err)
	}
}

func TestListStates(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "permall", "a longer first copy")
	mustStore(t, s, "permall", "short")
	mustStore(t, s, "savestate", "saved")
	mustStore(t, s, "savestate", "saved again")
	s.Close()
	os.WriteFile(filepath.Join(e.dir, "savestate.b.sealed"), []byte("VTPMSEAL torn"), 0o600)
	got, err := ListStates(e.dir)
	want := []StateInfo{{"permall", 5}, {"savestate", 5}}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("ListStates = %v, %v; want %v (the newest copy's size, a torn copy ignored)", got, err, want)
	}
}

func TestIsBlobFile(t *testing.T) {
	tests := []struct {
		name string
		want bool
	}{
		{"permall.a.sealed", true},
		{"volatilestate.b.sealed", true},
		{"savestate.a.sealed", true},
		{"permall.sealed", true},
		{"permall.sealed.prev", true},
		{"permall.sealed.tmp", true},
		{"permall.sealed.prev.tmp", true},
		{"permall.c.sealed", false},
		{"permall.sealedx", false},
		{"tpm2-00.permall", false},
		{StateFileName, false},
		{LockName, false},
	}
	for _, tt := range tests {
		if got := IsBlobFile(tt.name); got != tt.want {
			t.Errorf("IsBlobFile(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, dir string)
		key     []byte
		message string
	}{
		{"short key", nil, testKey[:31], "data key must be 32 bytes"},
		{"damaged state file", func(t *testing.T, dir string) {
			os.MkdirAll(dir, 0o700)
			os.WriteFile(filepath.Join(dir, StateFileName), []byte("{"), 0o600)
		}, testKey, "vtpm-state.json is damaged"},
		{"future state format", func(t *testing.T, dir string) {
			os.MkdirAll(dir, 0o700)
			os.WriteFile(filepath.Join(dir, StateFileName), []byte(`{"format":2,"uuid":"`+testUUID.String()+`"}`), 0o600)
		}, testKey, "has format 2"},
		{"sealed blobs without state file", func(t *testing.T, dir string) {
			os.MkdirAll(dir, 0o700)
			b, _ := Seal(testKey, testUUID, "permall", 1, []byte("x"))
			os.WriteFile(filepath.Join(dir, "permall.b.sealed"), b, 0o600)
		}, testKey, "permall.b.sealed names TPM " + testUUID.String()},
		{"legacy sealed blobs without state file", func(t *testing.T, dir string) {
			os.MkdirAll(dir, 0o700)
			b, _ := Seal(testKey, testUUID, "permall", 1, []byte("x"))
			os.WriteFile(filepath.Join(dir, "permall.sealed"), b, 0o600)
		}, testKey, "permall.sealed names TPM " + testUUID.String()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "tpm")
			if tt.prepare != nil {
				tt.prepare(t, dir)
			}
			s, err := Open(dir, Options{Key: tt.key})
			if err == nil {
				s.Close()
				t.Fatal("Open succeeded, want error")
			}
			if !strings.Contains(err.Error(), tt.message) {
				t.Errorf("error %q does not mention %q", err, tt.message)
			}
		})
	}
}

func TestClosedStore(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if _, err := s.Load("permall"); err == nil {
		t.Error("Load on a closed store succeeded")
	}
	if err := s.Store("permall", []byte("x")); err == nil {
		t.Error("Store on a closed store succeeded")
	}
}

func TestFileGenerations(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "gens")
	g := NewFileGenerations(dir)
	if last, err := g.Last(testUUID, "permall"); err != nil || last != 0 {
		t.Fatalf("Last on empty = %d, %v", last, err)
	}
	steps := []struct {
		record uint64
		want   uint64
	}{{3, 3}, {5, 5}, {4, 5}} // never decreases
	for _, st := range steps {
		if err := g.Record(testUUID, "permall", st.record); err != nil {
			t.Fatal(err)
		}
		if last, err := NewFileGenerations(dir).Last(testUUID, "permall"); err != nil || last != st.want {
			t.Fatalf("after Record(%d): Last = %d, %v; want %d", st.record, last, err, st.want)
		}
	}
	if last, _ := g.Last(otherUUID, "permall"); last != 0 {
		t.Errorf("another TPM sees generation %d", last)
	}
	os.WriteFile(filepath.Join(dir, testUUID.String()+".json"), []byte("not json"), 0o600)
	if _, err := g.Last(testUUID, "permall"); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Errorf("Last on a damaged record = %v, want a 'damaged' error", err)
	}
}
