package seal

import (
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"
)

// fakeGenerations is a Generations in memory whose first Record can be
// held (gate) and whose Records can be made to fail (fail), and which logs
// every Record call.
type fakeGenerations struct {
	mu      sync.Mutex
	last    map[string]uint64
	calls   []uint64 // generations passed to Record, in order
	started int
	fail    error
	entered chan uint64   // with gate: receives the first generation as its Record starts
	gate    chan struct{} // if set, the first Record waits until it is closed
}

func (f *fakeGenerations) Last(_ uuid.UUID, name string) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.last[name], nil
}

func (f *fakeGenerations) Record(_ uuid.UUID, name string, gen uint64) error {
	f.mu.Lock()
	f.started++
	hold := f.started == 1 && f.gate != nil
	f.mu.Unlock()
	if hold {
		f.entered <- gen
		<-f.gate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, gen)
	if f.fail != nil {
		return f.fail
	}
	if f.last == nil {
		f.last = map[string]uint64{}
	}
	f.last[name] = max(f.last[name], gen)
	return nil
}

func (f *fakeGenerations) state() (map[string]uint64, []uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := map[string]uint64{}
	for k, v := range f.last {
		m[k] = v
	}
	return m, slices.Clone(f.calls)
}

func openWith(t *testing.T, e *env, gens Generations) *Store {
	t.Helper()
	s, err := Open(e.dir, Options{Key: testKey, Generations: gens, Logger: slog.New(slog.NewTextHandler(e.logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestRecordOffWritePath holds Record and shows that writes complete
// meanwhile, that the generations written while it was held are recorded
// as one (the newest), and that Close records what is pending.
func TestRecordOffWritePath(t *testing.T) {
	e := newEnv(t)
	gens := &fakeGenerations{entered: make(chan uint64, 1), gate: make(chan struct{})}
	s := openWith(t, e, gens)
	mustStore(t, s, "permall", "1")
	if g := <-gens.entered; g != 1 {
		t.Fatalf("first Record is of generation %d, want 1", g)
	}
	// Record(1) is held: these writes must not wait for it.
	for _, d := range []string{"2", "3", "4", "5"} {
		mustStore(t, s, "permall", d)
	}
	// A rollback check in the meantime knows about generation 5.
	if last, err := s.lastSeen("permall"); err != nil || last != 5 {
		t.Errorf("lastSeen while Record is held = %d, %v; want 5", last, err)
	}
	close(gens.gate) // the goroutine then finds 5 pending
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	last, calls := gens.state()
	if last["permall"] != 5 {
		t.Errorf("recorded generation = %d, want 5", last["permall"])
	}
	if !slices.Equal(calls, []uint64{1, 5}) {
		t.Errorf("Record calls = %v, want [1 5] (2 to 4 coalesced into 5)", calls)
	}
}

func TestRecordFailure(t *testing.T) {
	e := newEnv(t)
	gens := &fakeGenerations{fail: errors.New("keystore is read-only")}
	s := openWith(t, e, gens)
	for _, d := range []string{"1", "2", "3"} {
		// The write is durable whether or not recording works.
		mustStore(t, s, "permall", d)
	}
	if got, err := s.Load("permall"); err != nil || string(got) != "3" {
		t.Fatalf("Load = %q, %v; want \"3\"", got, err)
	}
	err := s.Close()
	if err == nil || !strings.Contains(err.Error(), "keystore is read-only") || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("Close = %v, want an error naming the cause and what it means", err)
	}
	if n := strings.Count(e.logs.String(), "cannot record the generation"); n != 1 {
		t.Errorf("%d warnings about recording, want 1 per failure streak:\n%s", n, e.logs)
	}
	_, calls := gens.state()
	if calls[len(calls)-1] != 3 {
		t.Errorf("Record calls = %v, want the last to retry generation 3", calls)
	}
}

// TestRecordLostInCrash: a crash lost the records of the newest
// generations. The state on disk is newer than the record, which is no
// rollback; loading it records it again.
func TestRecordLostInCrash(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, func(o *Options) { o.Generations = nil })
	for _, d := range []string{"1", "2", "3"} {
		mustStore(t, s, "permall", d)
	}
	id := s.UUID()
	s.Close()
	if err := e.gens.Record(id, "permall", 1); err != nil { // all that reached the record
		t.Fatal(err)
	}
	s2 := e.open(t, nil)
	if got, err := s2.Load("permall"); err != nil || string(got) != "3" {
		t.Fatalf("Load = %q, %v; want \"3\"", got, err)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if last, _ := e.gens.Last(id, "permall"); last != 3 {
		t.Errorf("recorded generation after Load = %d, want 3", last)
	}
}
