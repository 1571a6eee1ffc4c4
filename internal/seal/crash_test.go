package seal

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// A crash can stop a write after any step. A process crash leaves what the
// steps did; a power loss can also leave a slot written in place but not
// yet fdatasynced in any mix of its old and new bytes, and can undo a
// rename not yet followed by a directory fsync. tear applies one such
// outcome to the slot being written.
type tear struct {
	name string
	// apply rewrites the target slot (or its temporary file) from the
	// bytes it held before the write (nil: none) and the new record.
	apply func(t *testing.T, w *slotWrite, old []byte)
	// possible reports whether this outcome can follow a crash that
	// stopped after the steps done (their names).
	possible func(w *slotWrite, done []string) bool
}

var tears = []tear{
	{name: "as the steps left it"},
	{
		name: "new bytes in the first half, old in the second",
		apply: func(t *testing.T, w *slotWrite, old []byte) {
			cut := len(w.sealed) / 2
			b := slices.Clone(w.sealed[:cut])
			if len(old) > cut {
				b = append(b, old[cut:]...)
			}
			writeFile(t, w.path, b)
		},
		possible: writtenNotSynced,
	},
	{
		name: "old bytes in the first half, new in the second",
		apply: func(t *testing.T, w *slotWrite, old []byte) {
			cut := len(w.sealed) / 2
			b := make([]byte, cut, len(w.sealed))
			copy(b, old)
			writeFile(t, w.path, append(b, w.sealed[cut:]...))
		},
		possible: writtenNotSynced,
	},
	{
		name: "new slot's rename undone",
		apply: func(t *testing.T, w *slotWrite, _ []byte) {
			if err := os.Rename(w.path, w.path+slotTmpExt); err != nil {
				t.Fatal(err)
			}
		},
		possible: func(w *slotWrite, done []string) bool {
			return w.create && slices.Contains(done, stepRename) && !slices.Contains(done, stepSyncDir)
		},
	},
	{
		name: "new slot file torn",
		apply: func(t *testing.T, w *slotWrite, _ []byte) {
			writeFile(t, w.path+slotTmpExt, w.sealed[:len(w.sealed)/3])
		},
		possible: func(w *slotWrite, done []string) bool {
			return w.create && !slices.Contains(done, stepCreate)
		},
	},
}

// writtenNotSynced: an in-place write has begun (the crash may be inside
// it) and its fdatasync has not completed.
func writtenNotSynced(w *slotWrite, done []string) bool {
	return !w.create && slices.Contains(done, stepOpen) && !slices.Contains(done, stepSync)
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// newestOnDisk returns the newest generation of permall that verifies in
// any file a read looks at, or 0 if none does.
func newestOnDisk(t *testing.T, e *env, s *Store) uint64 {
	t.Helper()
	var newest uint64
	for _, p := range copyPaths(e.dir, "permall") {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if plain, g, err := Unseal(testKey, s.UUID(), "permall", b); err == nil {
			clear(plain)
			newest = max(newest, g)
		}
	}
	return newest
}

// TestCrashDuringWrite stops a write after every step of the protocol, in
// every state a crash can leave the target slot in, and checks that a
// verifiable copy at least as new as the last acknowledged one exists at
// every instant, that the recorded generation never runs ahead of the
// disk, and that reopening loads the acknowledged or the new data and
// accepts further writes.
func TestCrashDuringWrite(t *testing.T) {
	long := "an earlier record much longer than the one written next"
	scenarios := []struct {
		name    string
		prepare func(t *testing.T, e *env, s *Store) // before the write
		damaged bool                                 // prepare damages the newest copy
		before  string                               // what is loaded if the write is lost; "" = nothing
		gen     uint64                               // generation of before (and at least what a crash leaves)
	}{
		{
			name:    "first write creates slot a",
			prepare: func(*testing.T, *env, *Store) {},
		},
		{
			name:    "second write creates slot b",
			prepare: func(t *testing.T, _ *env, s *Store) { mustStore(t, s, "permall", "one") },
			before:  "one", gen: 1,
		},
		{
			name: "in place over the older slot (longer record)",
			prepare: func(t *testing.T, _ *env, s *Store) {
				mustStore(t, s, "permall", "one")
				mustStore(t, s, "permall", "two")
			},
			before: "two", gen: 2,
		},
		{
			name: "in place over the older slot (shorter record)",
			prepare: func(t *testing.T, _ *env, s *Store) {
				mustStore(t, s, "permall", long)
				mustStore(t, s, "permall", "two")
			},
			before: "two", gen: 2,
		},
		{
			name: "in place over a damaged newest slot",
			prepare: func(t *testing.T, e *env, s *Store) {
				// A write of generation 2 torn by an earlier crash: it
				// was never acknowledged, so generation 1 is recorded.
				mustStore(t, s, "permall", "one")
				writeFile(t, filepath.Join(e.dir, "permall.b.sealed"), []byte("VTPMSEAL torn"))
				if got, err := s.Load("permall"); err != nil || string(got) != "one" {
					t.Fatalf("fallback Load = %q, %v", got, err)
				}
			},
			damaged: true, before: "one", gen: 1,
		},
		{
			name: "first write migrates the legacy layout",
			prepare: func(t *testing.T, e *env, s *Store) {
				for _, f := range []struct {
					file string
					gen  uint64
					data string
				}{{"permall.sealed", 2, "two"}, {"permall.sealed.prev", 1, "one"}, {"permall.sealed.tmp", 3, "x"}} {
					b, _ := Seal(testKey, s.UUID(), "permall", f.gen, []byte(f.data))
					writeFile(t, filepath.Join(e.dir, f.file), b)
				}
				if err := e.gens.Record(s.UUID(), "permall", 2); err != nil {
					t.Fatal(err)
				}
			},
			before: "two", gen: 2,
		},
	}
	const data = "three"
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			crashes := 0
			for stop := 0; ; stop++ {
				more := false
				for _, tr := range tears {
					ran, n := crashAt(t, sc.prepare, sc.damaged, sc.before, sc.gen, data, stop, tr)
					crashes += ran
					more = stop < n
				}
				if !more {
					break
				}
			}
			if crashes == 0 {
				t.Fatal("no crash was simulated")
			}
			t.Logf("%d crash states checked", crashes)
		})
	}
}

// crashAt runs one write up to step stop, applies tr if it is possible
// there, and checks recovery. It returns how many crashes it simulated (0
// or 1) and the write's number of steps.
func crashAt(t *testing.T, prepare func(*testing.T, *env, *Store), damaged bool, before string, beforeGen uint64, data string, stop int, tr tear) (int, int) {
	t.Helper()
	e := newEnv(t)
	s := e.open(t, nil)
	prepare(t, e, s)
	plan, err := s.prepareWrite("permall", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	if plan.gen <= beforeGen {
		t.Fatalf("next generation = %d, want more than %d", plan.gen, beforeGen)
	}
	n := len(plan.steps)
	if stop > n {
		s.Close()
		return 0, n
	}
	var done []string
	for _, st := range plan.steps[:stop] {
		done = append(done, st.what)
	}
	if tr.possible != nil && !tr.possible(plan.w, done) {
		s.Close()
		return 0, n
	}
	what := fmt.Sprintf("crash after %q, slot %s", done, tr.name)

	old, _ := os.ReadFile(plan.w.path)
	check := func(when string) {
		t.Helper()
		if g := newestOnDisk(t, e, s); beforeGen > 0 && g < beforeGen {
			t.Fatalf("%s, %s: newest verifiable copy is generation %d, want at least %d", what, when, g, beforeGen)
		}
	}
	for _, st := range plan.steps[:stop] {
		if err := st.run(); err != nil {
			t.Fatalf("%s: step %q: %v", what, st.what, err)
		}
		check("after " + st.what)
	}
	// The crash: the process is gone (its descriptor closed, the write's
	// generation never handed to the recorder), and with it maybe the
	// parts of the write not yet durable.
	if plan.w.f != nil {
		plan.w.f.Close()
	}
	s.Close()
	if tr.apply != nil {
		tr.apply(t, plan.w, old)
	}
	check("after the crash")
	// The write under test was never acknowledged, so it is not recorded;
	// what is recorded is on disk, unless the scenario damaged it.
	onDisk := newestOnDisk(t, e, s)
	if last, err := e.gens.Last(s.UUID(), "permall"); err != nil || last >= plan.gen || (last > onDisk && !damaged) {
		t.Fatalf("%s: recorded generation %d (%v): the write was not acknowledged, and the newest copy on disk is %d", what, last, err, onDisk)
	}

	// The new data is read back exactly when the whole record reached the
	// slot untorn: written (and cut to length when shorter than the old
	// record), or created and renamed into place.
	complete := slices.Contains(done, stepWrite) && (slices.Contains(done, stepTruncate) || len(plan.w.sealed) >= len(old)) ||
		slices.Contains(done, stepRename)
	want := before
	if complete && tr.apply == nil {
		want = data
	}
	s2 := e.open(t, nil)
	got, err := s2.Load("permall")
	switch {
	case want == "" && !errors.Is(err, fs.ErrNotExist):
		t.Fatalf("%s: Load = %q, %v; want fs.ErrNotExist (no state was ever complete)", what, got, err)
	case want != "" && (err != nil || string(got) != want):
		t.Fatalf("%s: Load = %q, %v; want %q", what, got, err, want)
	}
	mustStore(t, s2, "permall", "four")
	if got, err := s2.Load("permall"); err != nil || string(got) != "four" {
		t.Fatalf("%s: write after recovery: Load = %q, %v", what, got, err)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	s3 := e.open(t, nil)
	if got, err := s3.Load("permall"); err != nil || !bytes.Equal(got, []byte("four")) {
		t.Fatalf("%s: after reopening: Load = %q, %v", what, got, err)
	}
	s3.Close()
	return 1, n
}
