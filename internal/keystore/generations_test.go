package keystore

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/seal"
)

var _ seal.Generations = (*Generations)(nil)

func TestGenerationsRecord(t *testing.T) {
	a, b := uuid.New(), uuid.New()
	type rec struct {
		id   uuid.UUID
		name string
		gen  uint64
	}
	type last struct {
		id   uuid.UUID
		name string
		want uint64
	}
	tests := []struct {
		name    string
		records []rec
		checks  []last
	}{
		{"unknown TPM is 0", nil, []last{{a, "permall", 0}}},
		{"grows", []rec{{a, "permall", 1}, {a, "permall", 2}, {a, "permall", 7}}, []last{{a, "permall", 7}}},
		{"never lowers", []rec{{a, "permall", 9}, {a, "permall", 3}, {a, "permall", 0}}, []last{{a, "permall", 9}}},
		{"names are independent", []rec{{a, "permall", 4}, {a, "volatilestate", 2}, {a, "savestate", 11}},
			[]last{{a, "permall", 4}, {a, "volatilestate", 2}, {a, "savestate", 11}, {a, "other", 0}}},
		{"TPMs are independent", []rec{{a, "permall", 4}, {b, "permall", 8}},
			[]last{{a, "permall", 4}, {b, "permall", 8}}},
		{"max uint64", []rec{{a, "permall", ^uint64(0)}, {a, "permall", 1}}, []last{{a, "permall", ^uint64(0)}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ks")
			g := openFile(t, dir).Generations()
			for _, r := range tt.records {
				if err := g.Record(r.id, r.name, r.gen); err != nil {
					t.Fatalf("Record(%s, %d): %v", r.name, r.gen, err)
				}
			}
			// Check through a second open, as another process would see it.
			g2 := openFile(t, dir).Generations()
			for _, c := range tt.checks {
				got, err := g2.Last(c.id, c.name)
				if err != nil || got != c.want {
					t.Errorf("Last(%s) = %d, %v; want %d", c.name, got, err, c.want)
				}
			}
		})
	}
}

// TestGenerationsWithSeal checks the keystore as seal's rollback memory:
// restoring an old copy of a state directory is refused.
func TestGenerationsWithSeal(t *testing.T) {
	k := openFile(t, filepath.Join(t.TempDir(), "ks"))
	dek := bytes.Repeat([]byte{0x42}, 32)
	stateDir := filepath.Join(t.TempDir(), "tpm")
	backup := filepath.Join(t.TempDir(), "backup")
	opts := seal.Options{Key: dek, Generations: k.Generations()}

	s, err := seal.Open(stateDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Store("permall", []byte("generation one")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := os.CopyFS(backup, os.DirFS(stateDir)); err != nil {
		t.Fatal(err)
	}
	s, err = seal.Open(stateDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, gen := range []string{"two", "three"} {
		if err := s.Store("permall", []byte("generation "+gen)); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()

	// Put the old copy back.
	os.RemoveAll(stateDir)
	if err := os.CopyFS(stateDir, os.DirFS(backup)); err != nil {
		t.Fatal(err)
	}
	s, err = seal.Open(stateDir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Load("permall"); !errors.Is(err, seal.ErrRollback) {
		t.Fatalf("Load of a restored old copy: %v, want seal.ErrRollback", err)
	}
}

// recordMany records gens 1..n for name in a shuffled order and returns the
// first error.
func recordMany(g *Generations, id uuid.UUID, name string, n int, seed uint64) error {
	r := rand.New(rand.NewPCG(seed, 1))
	order := r.Perm(n)
	for _, i := range order {
		if err := g.Record(id, name, uint64(i+1)); err != nil {
			return err
		}
	}
	return nil
}

func TestGenerationsConcurrentGoroutines(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ks")
	id := uuid.New()
	const n = 60
	names := []string{"permall", "volatilestate", "savestate"}
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(names))
	// Two goroutines per blob name, half of them through a second Keystore
	// (its own lock file descriptor, as another process would have).
	ks := []*Keystore{openFile(t, dir), openFile(t, dir)}
	for i, name := range names {
		for j := range 2 {
			wg.Go(func() {
				errs <- recordMany(ks[j].Generations(), id, name, n, uint64(10*i+j))
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range names {
		if got, err := ks[0].Generations().Last(id, name); err != nil || got != n {
			t.Errorf("Last(%s) = %d, %v; want %d", name, got, err, n)
		}
	}
}

const helperEnv = "VTPM_KEYSTORE_TEST_HELPER"

// TestHelperProcess is the body of the child processes of
// TestGenerationsConcurrentProcesses; it does nothing in a normal run.
func TestHelperProcess(t *testing.T) {
	spec := os.Getenv(helperEnv)
	if spec == "" {
		t.Skip("helper process only")
	}
	var dir, ids, name string
	var n int
	var seed uint64
	if _, err := fmt.Sscan(spec, &dir, &ids, &name, &n, &seed); err != nil {
		t.Fatalf("bad %s=%q: %v", helperEnv, spec, err)
	}
	// Open races the other process to create the keystore: both must end
	// up with the same master key.
	k, err := Open(dir, quietOpts("none"))
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	if err := recordMany(k.Generations(), uuid.MustParse(ids), name, n, seed); err != nil {
		t.Fatal(err)
	}
}

func TestGenerationsConcurrentProcesses(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ks") // created by the children, concurrently
	id := uuid.New()
	const n = 80
	// Two processes update different blobs of the same TPM (a lost update
	// of the shared record would drop one of them) and a third races one
	// of them on the same blob.
	jobs := []struct {
		name string
		seed uint64
	}{{"permall", 1}, {"volatilestate", 2}, {"permall", 3}}
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for _, j := range jobs {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
		cmd.Env = append(os.Environ(), helperEnv+"="+fmt.Sprintf("%s %s %s %d %d", dir, id, j.name, n, j.seed))
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, cmd), append(outs, &out)
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("helper %d (%s): %v\n%s", i, jobs[i].name, err, outs[i])
		}
	}
	g := openFile(t, dir).Generations()
	for _, name := range []string{"permall", "volatilestate"} {
		if got, err := g.Last(id, name); err != nil || got != n {
			t.Errorf("Last(%s) = %d, %v; want %d", name, got, err, n)
		}
	}
	// No temp files left behind.
	ents, _ := os.ReadDir(filepath.Join(dir, genKind))
	if len(ents) != 1 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("generations dir holds %v, want just the record", names)
	}
}
