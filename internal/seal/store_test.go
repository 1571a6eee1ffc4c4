package seal

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
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
	if last, _ := e.gens.Last(s.UUID(), "permall"); last != 3 {
		t.Errorf("recorded generation = %d, want 3", last)
	}
	prev, err := os.ReadFile(filepath.Join(e.dir, "permall.sealed.prev"))
	if err != nil {
		t.Fatal(err)
	}
	if p, g, err := Unseal(testKey, s.UUID(), "permall", prev); err != nil || g != 2 || string(p) != "two" {
		t.Errorf("permall.sealed.prev = (%q, %d, %v), want generation 2 \"two\"", p, g, err)
	}
	for _, f := range []string{StateFileName, "permall.sealed", "permall.sealed.prev"} {
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

	// Reopening keeps the UUID and the state, and generations keep growing.
	id := s.UUID()
	s.Close()
	s2 := e.open(t, func(o *Options) { o.FileMode = 0o640 })
	if s2.UUID() != id {
		t.Fatalf("UUID changed across Open: %s -> %s", id, s2.UUID())
	}
	mustStore(t, s2, "permall", "four")
	if g, _ := s2.Generation("permall"); g != 4 {
		t.Errorf("generation after reopen = %d, want 4", g)
	}
	if st, _ := os.Stat(filepath.Join(e.dir, "permall.sealed")); st.Mode().Perm() != 0o640 {
		t.Errorf("mode with FileMode 0640 = %v", st.Mode().Perm())
	}
}

func TestDelete(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "volatilestate", "a")
	mustStore(t, s, "volatilestate", "b")
	if err := s.Delete("volatilestate", true); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"volatilestate.sealed", "volatilestate.sealed.prev"} {
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
	// A new copy after a delete still outgrows the recorded generation.
	mustStore(t, s, "volatilestate", "c")
	if g, _ := s.Generation("volatilestate"); g != 3 {
		t.Errorf("generation after delete and store = %d, want 3", g)
	}
}

func TestLoadTamper(t *testing.T) {
	type setup struct {
		e    *env
		s    *Store
		path string // permall.sealed
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
	}{
		{
			name:    "flipped header byte",
			tamper:  flipAt(func(int) int { return 15 }),
			want:    ErrAuth,
			message: []string{"permall.sealed: authentication failed (wrong data key, or the file was modified)"},
		},
		{
			name:    "flipped ciphertext byte",
			tamper:  flipAt(func(int) int { return headerLen }),
			want:    ErrAuth,
			message: []string{"permall.sealed: authentication failed"},
		},
		{
			name:    "flipped tag byte",
			tamper:  flipAt(func(n int) int { return n - 3 }),
			want:    ErrAuth,
			message: []string{"permall.sealed: authentication failed"},
		},
		{
			name:    "truncated",
			tamper:  modify(func(b []byte) []byte { return b[:len(b)-10] }),
			want:    ErrTruncated,
			message: []string{"permall.sealed: truncated"},
		},
		{
			name: "blob from another TPM",
			tamper: func(t *testing.T, st setup) {
				other := &env{dir: filepath.Join(t.TempDir(), "other"), gens: st.e.gens, logs: st.e.logs}
				o := other.open(t, nil)
				mustStore(t, o, "permall", "other TPM's state")
				copyFrom(t, filepath.Join(other.dir, "permall.sealed"), st.path)
			},
			want:    ErrWrongTPM,
			message: []string{"permall.sealed: holds state of TPM ", ", this is TPM "},
		},
		{
			name: "volatilestate put in place of permall",
			tamper: func(t *testing.T, st setup) {
				copyFrom(t, filepath.Join(st.e.dir, "volatilestate.sealed"), st.path)
			},
			want:    ErrWrongType,
			message: []string{"permall.sealed: holds volatile state, expected permanent state"},
		},
		{
			name: "older generation put back",
			tamper: func(t *testing.T, st setup) {
				copyFrom(t, filepath.Join(st.e.dir, "old-permall"), st.path)
			},
			want:    ErrRollback,
			message: []string{"permall.sealed is generation 1, but generation 2", "pass --allow-rollback to restore an older copy deliberately"},
		},
		{
			name:    "wrong key",
			tamper:  func(*testing.T, setup) {},
			opts:    func(o *Options) { o.Key = otherKey },
			want:    ErrAuth,
			message: []string{"permall.sealed: authentication failed (wrong data key"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			s := e.open(t, nil)
			mustStore(t, s, "permall", "generation one")
			b, _ := os.ReadFile(filepath.Join(e.dir, "permall.sealed"))
			os.WriteFile(filepath.Join(e.dir, "old-permall"), b, 0o600)
			mustStore(t, s, "permall", "generation two")
			mustStore(t, s, "volatilestate", "volatile")
			s.Close()
			// Without a previous copy the failure cannot be papered over.
			os.Remove(filepath.Join(e.dir, "permall.sealed.prev"))
			tt.tamper(t, setup{e: e, s: s, path: filepath.Join(e.dir, "permall.sealed")})

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
	old, _ := os.ReadFile(filepath.Join(e.dir, "permall.sealed"))
	mustStore(t, s, "permall", "two")
	mustStore(t, s, "permall", "three")
	s.Close()
	os.WriteFile(filepath.Join(e.dir, "permall.sealed"), old, 0o600)

	s2 := e.open(t, func(o *Options) { o.AllowRollback = true })
	got, err := s2.Load("permall")
	if err != nil || string(got) != "one" {
		t.Fatalf("Load with AllowRollback = %q, %v; want \"one\"", got, err)
	}
	if !strings.Contains(e.logs.String(), "older generation") {
		t.Errorf("no warning logged for a deliberate rollback: %s", e.logs)
	}
	// The next write must still outgrow everything seen.
	mustStore(t, s2, "permall", "four")
	if g, _ := s2.Generation("permall"); g != 4 {
		t.Errorf("generation after rollback and store = %d, want 4", g)
	}
}

func TestMissingPermallWithHistory(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "permall", "one")
	s.Close()
	os.Remove(filepath.Join(e.dir, "permall.sealed"))
	os.Remove(filepath.Join(e.dir, "permall.sealed.prev"))

	s2 := e.open(t, nil)
	if _, err := s2.Load("permall"); !errors.Is(err, ErrRollback) || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load of deleted permall = %v, want ErrRollback (not fs.ErrNotExist)", err)
	}
	s2.Close()
	s3 := e.open(t, func(o *Options) { o.AllowRollback = true })
	if _, err := s3.Load("permall"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load with AllowRollback = %v, want fs.ErrNotExist", err)
	}
}

func TestFallbackToPrevious(t *testing.T) {
	corrupt := func(b []byte) []byte { b[len(b)-1] ^= 1; return b }
	truncate := func(b []byte) []byte { return b[:len(b)/2] }
	tests := []struct {
		name       string
		cur, prev  func([]byte) []byte // nil: leave alone
		removeCur  bool
		want       string // loaded content; "" means an error
		wantErr    []string
		wantWarn   bool
		storeAfter bool
	}{
		{name: "corrupt newest", cur: corrupt, want: "two", wantWarn: true, storeAfter: true},
		{name: "truncated newest", cur: truncate, want: "two", wantWarn: true},
		{name: "missing newest", removeCur: true, want: "two", wantWarn: true},
		{name: "both corrupt", cur: corrupt, prev: truncate, wantErr: []string{
			"permall.sealed: authentication failed", "permall.sealed.prev: truncated"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			s := e.open(t, nil)
			for _, d := range []string{"one", "two", "three"} {
				mustStore(t, s, "permall", d)
			}
			s.Close()
			cur := filepath.Join(e.dir, "permall.sealed")
			for _, c := range []struct {
				path string
				f    func([]byte) []byte
			}{{cur, tt.cur}, {cur + ".prev", tt.prev}} {
				if c.f != nil {
					b, _ := os.ReadFile(c.path)
					os.WriteFile(c.path, c.f(b), 0o600)
				}
			}
			if tt.removeCur {
				os.Remove(cur)
			}
			before := snapshot(t, filepath.Dir(e.dir))
			s2 := e.open(t, nil)
			got, err := s2.Load("permall")
			if tt.want == "" {
				if err == nil {
					t.Fatalf("Load = %q, want an error", got)
				}
				for _, m := range tt.wantErr {
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
			if tt.wantWarn && (!strings.Contains(logs, "level=WARN") || !strings.Contains(logs, "permall.sealed")) {
				t.Errorf("no warning naming permall.sealed was logged: %s", logs)
			}
			if !tt.storeAfter {
				return
			}
			// The damaged newest copy is replaced, the good previous copy kept.
			mustStore(t, s2, "permall", "four")
			prev, _ := os.ReadFile(cur + ".prev")
			if p, g, err := Unseal(testKey, s2.UUID(), "permall", prev); err != nil || string(p) != "two" || g != 2 {
				t.Errorf("previous copy after store = (%q, %d, %v), want generation 2 \"two\"", p, g, err)
			}
			if g, _ := s2.Generation("permall"); g != 4 {
				t.Errorf("generation after store = %d, want 4", g)
			}
		})
	}
}

func TestOldPairPutBackIsRollback(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	var files [][]byte
	for _, d := range []string{"one", "two", "three", "four"} {
		mustStore(t, s, "permall", d)
		b, _ := os.ReadFile(filepath.Join(e.dir, "permall.sealed"))
		files = append(files, b)
	}
	s.Close()
	// A damaged newest copy must not unlock a previous copy more than one generation back.
	os.WriteFile(filepath.Join(e.dir, "permall.sealed"), []byte("garbage"), 0o600)
	os.WriteFile(filepath.Join(e.dir, "permall.sealed.prev"), files[1], 0o600)
	s2 := e.open(t, nil)
	if _, err := s2.Load("permall"); !errors.Is(err, ErrRollback) {
		t.Errorf("Load = %v, want ErrRollback", err)
	}
}

func TestCrashDuringWrite(t *testing.T) {
	tests := []struct {
		name       string
		corruptCur bool
		wantBefore string
	}{
		{name: "rotating a good copy", wantBefore: "two"},
		{name: "replacing a damaged copy", corruptCur: true, wantBefore: "one"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for stop := 0; ; stop++ {
				e := newEnv(t)
				s := e.open(t, nil)
				mustStore(t, s, "permall", "one")
				mustStore(t, s, "permall", "two")
				cur := filepath.Join(e.dir, "permall.sealed")
				if tt.corruptCur {
					os.WriteFile(cur, []byte("VTPMSEAL torn"), 0o600)
					if got, err := s.Load("permall"); err != nil || string(got) != "one" {
						t.Fatalf("fallback Load = %q, %v", got, err)
					}
				}
				steps, gen, err := s.prepareWrite("permall", []byte("three"))
				if err != nil {
					t.Fatal(err)
				}
				if gen != 3 {
					t.Fatalf("next generation = %d, want 3", gen)
				}
				if stop > len(steps) {
					s.Close()
					break
				}
				renamed := false
				for i, st := range steps[:stop] {
					if err := st.run(); err != nil {
						t.Fatalf("step %d (%s): %v", i, st.what, err)
					}
					renamed = renamed || st.what == "replace current copy"
					assertVerifiableCopy(t, e.dir, s)
				}
				// The crash: the process dies here, without recording the
				// generation, possibly with a torn temporary file.
				s.Close()
				if b, err := os.ReadFile(cur + ".tmp"); err == nil {
					os.WriteFile(cur+".tmp", b[:len(b)/2], 0o600)
				}

				want := tt.wantBefore
				if renamed {
					want = "three"
				}
				s2 := e.open(t, nil)
				got, err := s2.Load("permall")
				if err != nil || string(got) != want {
					t.Fatalf("after stopping before step %d: Load = %q, %v; want %q", stop, got, err, want)
				}
				mustStore(t, s2, "permall", "four")
				if got, err := s2.Load("permall"); err != nil || string(got) != "four" {
					t.Fatalf("write after recovery: Load = %q, %v", got, err)
				}
				s2.Close()
			}
		})
	}
}

// assertVerifiableCopy checks that the current or previous file verifies.
func assertVerifiableCopy(t *testing.T, dir string, s *Store) {
	t.Helper()
	for _, f := range []string{"permall.sealed", "permall.sealed.prev"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			continue
		}
		if _, _, err := Unseal(testKey, s.UUID(), "permall", b); err == nil {
			return
		}
	}
	t.Fatalf("no verifiable copy of permall on disk")
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

func TestStoreAfterCurrentRemoved(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "savestate", "one")
	mustStore(t, s, "savestate", "two")
	os.Remove(filepath.Join(e.dir, "savestate.sealed"))
	mustStore(t, s, "savestate", "three")
	if got, err := s.Load("savestate"); err != nil || string(got) != "three" {
		t.Fatalf("Load = %q, %v; want \"three\"", got, err)
	}
	prev, _ := os.ReadFile(filepath.Join(e.dir, "savestate.sealed.prev"))
	if p, _, err := Unseal(testKey, s.UUID(), "savestate", prev); err != nil || string(p) != "one" {
		t.Errorf("previous copy = %q, %v; want \"one\" kept", p, err)
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
