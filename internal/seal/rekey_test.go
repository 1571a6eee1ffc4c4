package seal

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"
)

var newTestKey = bytes.Repeat([]byte{0x5c}, 32)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// twoSlotState writes permall twice and volatilestate once under testKey:
// permall in both slots ("p1" at generation 1, "p2" at 2), volatilestate
// in one ("v1").
func twoSlotState(t *testing.T) (*env, uuid.UUID) {
	t.Helper()
	e := newEnv(t)
	s := e.open(t, nil)
	mustStore(t, s, "permall", "p1")
	mustStore(t, s, "permall", "p2")
	mustStore(t, s, "volatilestate", "v1")
	id := s.UUID()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return e, id
}

// loads opens dir with key and returns its permall and volatilestate, or
// the first error.
func loads(t *testing.T, e *env, dir string, key []byte) (string, string, error) {
	t.Helper()
	return loadsWith(t, e.gens, dir, key)
}

// loadsWith is loads with the generation record gens.
func loadsWith(t *testing.T, gens Generations, dir string, key []byte) (string, string, error) {
	t.Helper()
	s, err := Open(dir, Options{Key: key, Generations: gens, Logger: quietLog()})
	if err != nil {
		return "", "", err
	}
	defer s.Close()
	p, err := s.Load("permall")
	if err != nil {
		return "", "", err
	}
	v, err := s.Load("volatilestate")
	if err != nil {
		return "", "", err
	}
	return string(p), string(v), nil
}

// copyDir copies the files of a state directory, as a crash would leave
// them at that moment.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "crash")
	if err := os.Mkdir(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range entries {
		if de.Name() == LockName {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, de.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, de.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// recordAt is a generation record frozen as it was at one moment: what a
// crash at that moment leaves beside the copied directory.
type recordAt struct {
	mu   sync.Mutex
	gens map[string]uint64
}

func freezeRecord(t *testing.T, g Generations, id uuid.UUID) *recordAt {
	t.Helper()
	r := &recordAt{gens: map[string]uint64{}}
	for _, n := range Names {
		v, err := g.Last(id, n)
		if err != nil {
			t.Fatal(err)
		}
		r.gens[n] = v
	}
	return r
}

func (r *recordAt) Last(_ uuid.UUID, name string) (uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gens[name], nil
}

func (r *recordAt) Record(_ uuid.UUID, name string, gen uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.gens[name] = max(r.gens[name], gen)
	return nil
}

func TestRekey(t *testing.T) {
	e, id := twoSlotState(t)
	var beforeCommit, afterCommit string
	var recordBefore, recordAfter *recordAt
	commit := func() error {
		beforeCommit = copyDir(t, e.dir)
		recordBefore = freezeRecord(t, e.gens, id)
		// The key protector would be written here; a marker stands in.
		if err := os.WriteFile(filepath.Join(e.dir, "key-switched"), nil, 0o600); err != nil {
			return err
		}
		afterCommit = copyDir(t, e.dir)
		recordAfter = freezeRecord(t, e.gens, id)
		return nil
	}
	if err := Rekey(e.dir, Options{Key: testKey, Generations: e.gens, Logger: quietLog()}, newTestKey, commit); err != nil {
		t.Fatalf("Rekey: %v", err)
	}
	// A crash just before the switch: the old key opens the old state.
	if p, v, err := loadsWith(t, recordBefore, beforeCommit, testKey); err != nil || p != "p2" || v != "v1" {
		t.Errorf("before the switch, the old key loads %q, %q, %v; want p2, v1", p, v, err)
	}
	// A crash just after it: the new key opens the same state.
	if p, v, err := loadsWith(t, recordAfter, afterCommit, newTestKey); err != nil || p != "p2" || v != "v1" {
		t.Errorf("after the switch, the new key loads %q, %q, %v; want p2, v1", p, v, err)
	}
	// Done: the new key opens it; no copy under the old key is left.
	if p, v, err := loads(t, e, e.dir, newTestKey); err != nil || p != "p2" || v != "v1" {
		t.Fatalf("after Rekey the new key loads %q, %q, %v; want p2, v1", p, v, err)
	}
	if _, _, err := loads(t, e, e.dir, testKey); !errors.Is(err, ErrAuth) {
		t.Errorf("after Rekey the old key loads the state (%v); want ErrAuth", err)
	}
	if err := CheckKey(e.dir, testKey); !errors.Is(err, ErrAuth) {
		t.Errorf("CheckKey(old key) = %v; want ErrAuth", err)
	}
	if err := CheckKey(e.dir, newTestKey); err != nil {
		t.Errorf("CheckKey(new key) = %v", err)
	}
	var sealed []string
	entries, _ := os.ReadDir(e.dir)
	for _, de := range entries {
		if IsBlobFile(de.Name()) {
			sealed = append(sealed, de.Name())
		}
	}
	if want := []string{slotFile("permall", 0), slotFile("volatilestate", 1)}; !slices.Equal(sealed, want) {
		t.Errorf("sealed files after Rekey: %v; want %v (the new copies only)", sealed, want)
	}
	// Each blob moved on one generation, and the record knows it.
	for name, want := range map[string]uint64{"permall": 3, "volatilestate": 2} {
		if got, err := e.gens.Last(id, name); err != nil || got != want {
			t.Errorf("recorded generation of %s: %d, %v; want %d", name, got, err, want)
		}
	}
}

func TestRekeyRefusals(t *testing.T) {
	tests := []struct {
		name     string
		setup    func(t *testing.T, e *env, id uuid.UUID) func() // returns a cleanup
		opts     func(*Options)
		commit   error
		want     error
		msg      string
		recorded uint64 // permall's recorded generation afterwards
	}{
		{
			name: "running TPM",
			setup: func(t *testing.T, e *env, _ uuid.UUID) func() {
				s := e.open(t, nil)
				return func() { s.Close() }
			},
			want: ErrLocked, recorded: 2,
		},
		{
			name: "wrong old key",
			opts: func(o *Options) { o.Key = bytes.Repeat([]byte{7}, 32) },
			want: ErrAuth, recorded: 2,
			setup: func(*testing.T, *env, uuid.UUID) func() { return func() {} },
		},
		{
			name: "older state than recorded",
			setup: func(t *testing.T, e *env, id uuid.UUID) func() {
				if err := e.gens.Record(id, "permall", 9); err != nil {
					t.Fatal(err)
				}
				return func() {}
			},
			want: ErrRollback, recorded: 9,
		},
		{
			name:   "commit fails",
			setup:  func(*testing.T, *env, uuid.UUID) func() { return func() {} },
			commit: errors.New("disk full"),
			msg:    "disk full", recorded: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, id := twoSlotState(t)
			done := tt.setup(t, e, id)
			before := snapshot(t, e.dir)
			opts := Options{Key: testKey, Generations: e.gens, Logger: quietLog()}
			if tt.opts != nil {
				tt.opts(&opts)
			}
			committed := false
			err := Rekey(e.dir, opts, newTestKey, func() error { committed = true; return tt.commit })
			done()
			if err == nil {
				t.Fatal("Rekey succeeded")
			}
			if (tt.want != nil && !errors.Is(err, tt.want)) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("Rekey = %v; want %v saying %q", err, tt.want, tt.msg)
			}
			if committed != (tt.commit != nil) {
				t.Errorf("commit called: %v", committed)
			}
			if tt.commit == nil && !equalSnapshots(snapshot(t, e.dir), before) {
				t.Error("the refused Rekey changed the state directory")
			}
			if got, _ := e.gens.Last(id, "permall"); got != tt.recorded {
				t.Errorf("recorded permall generation %d after a failed Rekey; want %d", got, tt.recorded)
			}
			if tt.want == ErrRollback {
				return
			}
			// Whatever happened, the old key still opens the state as it was.
			if p, v, err := loads(t, e, e.dir, testKey); err != nil || p != "p2" || v != "v1" {
				t.Errorf("after the failed Rekey the old key loads %q, %q, %v; want p2, v1", p, v, err)
			}
		})
	}
}

func TestRekeyLegacyLayout(t *testing.T) {
	e, _ := legacyEnv(t)
	if err := Rekey(e.dir, Options{Key: testKey, Generations: e.gens, Logger: quietLog()}, newTestKey, func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	s, err := Open(e.dir, Options{Key: newTestKey, Generations: e.gens, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if p, err := s.Load("permall"); err != nil || string(p) != "two" {
		t.Errorf("after re-keying a legacy layout: %q, %v; want two", p, err)
	}
	for _, f := range []string{"permall.sealed", "permall.sealed.prev", "permall.sealed.tmp"} {
		if _, err := os.Stat(filepath.Join(e.dir, f)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s is left after re-keying: %v", f, err)
		}
	}
}

func TestRekeyNoState(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tpm")
	err := Rekey(dir, Options{Key: testKey, Logger: quietLog()}, newTestKey, func() error { return nil })
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Rekey(no state) = %v; want fs.ErrNotExist", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Error("Rekey created the state directory")
	}
	// A TPM with an identity but no blob yet re-keys by committing alone.
	if _, err := Identify(dir); err != nil {
		t.Fatal(err)
	}
	called := false
	if err := Rekey(dir, Options{Key: testKey, Logger: quietLog()}, newTestKey, func() error { called = true; return nil }); err != nil || !called {
		t.Fatalf("Rekey(no blobs) = %v, commit called %v", err, called)
	}
	if err := CheckKey(dir, testKey); err != nil {
		t.Errorf("CheckKey without blobs = %v; want nil", err)
	}
}
