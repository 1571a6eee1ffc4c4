package keystore

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/seal"
	"vtpm/internal/testutil"
)

var _ seal.Generations = (*Pinned)(nil)

// generations is what both Generations and Pinned offer.
type generations interface {
	Last(id uuid.UUID, name string) (uint64, error)
	Record(id uuid.UUID, name string, gen uint64) error
}

// readers gives, for a keystore dir and a TPM, the two ways to read and
// write its record: the keystore's Generations and a Pinned.
var readers = []struct {
	name string
	open func(t *testing.T, dir string, id uuid.UUID) generations
}{
	{"Generations", func(t *testing.T, dir string, id uuid.UUID) generations { return openFile(t, dir).Generations() }},
	{"Pinned", func(t *testing.T, dir string, id uuid.UUID) generations {
		p, err := openFile(t, dir).Generations().Pin(id)
		if err != nil {
			t.Fatalf("Pin: %v", err)
		}
		t.Cleanup(func() { p.Close() })
		return p
	}},
	{"Shared", func(t *testing.T, dir string, id uuid.UUID) generations { return share(t, openFile(t, dir), id) }},
}

// share pins id's record as a process served by the host service does:
// from the record's file and key alone.
func share(t *testing.T, k *Keystore, id uuid.UUID) *Pinned {
	t.Helper()
	f, key, err := k.Generations().Share(id)
	if err != nil {
		t.Fatalf("Share: %v", err)
	}
	defer key.Close()
	p, err := PinShared(f, id, key.Bytes())
	if err != nil {
		t.Fatalf("PinShared: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// A shared record opens only with its own key and for its own TPM.
func TestPinSharedRefusesWrongKeyOrTPM(t *testing.T) {
	a, b := uuid.New(), uuid.New()
	k := openFile(t, filepath.Join(t.TempDir(), "ks"))
	if err := share(t, k, a).Record(a, "permall", 7); err != nil {
		t.Fatal(err)
	}
	_, keyB, err := k.Generations().Share(b)
	if err != nil {
		t.Fatal(err)
	}
	defer keyB.Close()
	tests := []struct {
		name string
		id   uuid.UUID
		key  []byte
	}{
		{"another TPM's key", a, keyB.Bytes()},
		{"another TPM's id", b, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, key, err := k.Generations().Share(a)
			if err != nil {
				t.Fatal(err)
			}
			defer key.Close()
			use := tt.key
			if use == nil {
				use = key.Bytes()
			}
			if p, err := PinShared(f, tt.id, use); err == nil {
				p.Close()
				t.Error("PinShared opened the record")
			}
		})
	}
}

func TestPinnedRoundTrip(t *testing.T) {
	a, b := uuid.New(), uuid.New()
	dir := filepath.Join(t.TempDir(), "ks")
	k := openFile(t, dir)
	p, err := k.Generations().Pin(a)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if got, err := p.Last(a, "permall"); err != nil || got != 0 {
		t.Errorf("Last on a new record = %d, %v; want 0", got, err)
	}
	// Generations of this process and of another (its own Keystore) write
	// the same record as the Pinned.
	other := openFile(t, dir).Generations()
	steps := []struct {
		w    generations
		name string
		gen  uint64
	}{
		{p, "permall", 3}, {p, "volatilestate", 1}, {other, "permall", 5}, {p, "permall", 4},
		{p, "savestate", ^uint64(0)}, {k.Generations(), "volatilestate", 2}, {p, "permall", 6},
	}
	for _, s := range steps {
		if err := s.w.Record(a, s.name, s.gen); err != nil {
			t.Fatalf("Record(%s, %d): %v", s.name, s.gen, err)
		}
	}
	// The keystore's master key and record keys are gone once it is
	// closed; the Pinned keeps working.
	k.Close()
	if err := p.Record(a, "permall", 7); err != nil {
		t.Fatalf("Record after the keystore was closed: %v", err)
	}
	want := map[string]uint64{"permall": 7, "volatilestate": 2, "savestate": ^uint64(0), "other": 0}
	fresh := openFile(t, dir).Generations()
	for name, w := range want {
		for _, r := range []generations{p, fresh} {
			if got, err := r.Last(a, name); err != nil || got != w {
				t.Errorf("%T.Last(%s) = %d, %v; want %d", r, name, got, err, w)
			}
		}
	}
	// Other TPMs are refused, and nothing is written for them.
	if err := p.Record(b, "permall", 1); err == nil {
		t.Error("Pinned.Record accepted another TPM")
	}
	if _, err := p.Last(b, "permall"); err == nil {
		t.Error("Pinned.Last accepted another TPM")
	}
	if _, err := os.Stat(filepath.Join(dir, genKind, b.String())); err == nil {
		t.Error("Pinned created a record for another TPM")
	}
	p.Close()
	if err := p.Record(a, "permall", 8); err == nil {
		t.Error("Record after Close succeeded")
	}
}

func TestPinnedMonotonic(t *testing.T) {
	id := uuid.New()
	dir := filepath.Join(t.TempDir(), "ks")
	p, err := openFile(t, dir).Generations().Pin(id)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// Shuffled records through the Pinned (two goroutines) and through a
	// second keystore, as a CLI command would, on the same blob.
	const n = 60
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for j := range 2 {
		wg.Go(func() { errs <- recordManyTo(p, id, "permall", n, uint64(j)) })
	}
	wg.Go(func() { errs <- recordMany(openFile(t, dir).Generations(), id, "permall", n, 7) })
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, low := range []uint64{0, 1, n - 1, n} {
		if err := p.Record(id, "permall", low); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := openFile(t, dir).Generations().Last(id, "permall"); err != nil || got != n {
		t.Errorf("Last = %d, %v; want %d", got, err, n)
	}
}

func recordManyTo(g generations, id uuid.UUID, name string, n int, seed uint64) error {
	for i := range n {
		gen := uint64((i*7+int(seed)*13)%n + 1)
		if err := g.Record(id, name, gen); err != nil {
			return err
		}
	}
	// Every value 1..n is recorded at least once only if 7 and n are
	// coprime; make sure the maximum is.
	return g.Record(id, name, uint64(n))
}

// TestGenerationsTornSlot damages the record file the ways a crash (or a
// bad disk) can and checks what each reader then sees. After recording 5
// then 6, slot 0 holds 6 (newest) and slot 1 holds 5.
func TestGenerationsTornSlot(t *testing.T) {
	flip := func(off int) func([]byte) []byte {
		return func(b []byte) []byte { b[off] ^= 1; return b }
	}
	tests := []struct {
		name   string
		damage func([]byte) []byte
		want   uint64 // 0: ErrCorrupt
	}{
		{"intact", func(b []byte) []byte { return b }, 6},
		{"newest slot torn", flip(genSlotSize / 2), 5},
		{"newest slot tag", flip(genSlotSize - 1), 5},
		{"older slot torn", flip(genSlotSize + 100), 6},
		{"older slot cut short", func(b []byte) []byte { return b[:genSlotSize+300] }, 6},
		{"older slot missing", func(b []byte) []byte { return b[:genSlotSize] }, 6},
		{"newest slot zeroed", func(b []byte) []byte { clear(b[:genSlotSize]); return b }, 5},
		{"both slots torn", func(b []byte) []byte { b[100] ^= 1; b[genSlotSize+100] ^= 1; return b }, 0},
		{"slots swapped", func(b []byte) []byte {
			return append(append([]byte{}, b[genSlotSize:]...), b[:genSlotSize]...)
		}, 0},
		{"empty file", func(b []byte) []byte { return nil }, 0},
	}
	for _, r := range readers {
		for _, tt := range tests {
			t.Run(r.name+"/"+tt.name, func(t *testing.T) {
				dir := filepath.Join(t.TempDir(), "ks")
				id := uuid.New()
				g := openFile(t, dir).Generations()
				for _, gen := range []uint64{5, 6} {
					if err := g.Record(id, "permall", gen); err != nil {
						t.Fatal(err)
					}
				}
				p := filepath.Join(dir, genKind, id.String())
				b, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				if len(b) != genSlots*genSlotSize {
					t.Fatalf("record file is %d bytes, want %d", len(b), genSlots*genSlotSize)
				}
				if err := os.WriteFile(p, tt.damage(b), 0o600); err != nil {
					t.Fatal(err)
				}
				if tt.want == 0 {
					// Never read a damaged record as "nothing seen yet", and
					// never paper over it.
					if _, err := g.Last(id, "permall"); !errors.Is(err, ErrCorrupt) {
						t.Errorf("Last: %v, want ErrCorrupt", err)
					}
					if _, err := g.Pin(id); !errors.Is(err, ErrCorrupt) {
						t.Errorf("Pin: %v, want ErrCorrupt", err)
					}
					before, _ := os.ReadFile(p)
					if err := g.Record(id, "permall", 9); !errors.Is(err, ErrCorrupt) {
						t.Errorf("Record: %v, want ErrCorrupt", err)
					}
					if after, _ := os.ReadFile(p); !bytes.Equal(after, before) {
						t.Error("Record rewrote a damaged generation record")
					}
					return
				}
				rw := r.open(t, dir, id)
				if got, err := rw.Last(id, "permall"); err != nil || got != tt.want {
					t.Fatalf("Last = %d, %v; want %d", got, err, tt.want)
				}
				// The next write goes to the slot not holding the newest
				// copy, and the one after it to the other: both survive.
				for _, gen := range []uint64{10, 11} {
					if err := rw.Record(id, "permall", gen); err != nil {
						t.Fatal(err)
					}
				}
				if got, err := openFile(t, dir).Generations().Last(id, "permall"); err != nil || got != 11 {
					t.Errorf("Last after recording 11 = %d, %v", got, err)
				}
				b, _ = os.ReadFile(p)
				gf := &genFile{path: p, id: id, log: quietOpts("none").Logger}
				if gf.aead, err = openFile(t, dir).genAEAD(id); err != nil {
					t.Fatal(err)
				}
				var seen []uint64
				for slot := range genSlots {
					if r, ok := gf.openSlot(slot, b[slot*genSlotSize:(slot+1)*genSlotSize]); ok {
						seen = append(seen, r.gens["permall"])
					}
				}
				if len(seen) != 2 {
					t.Errorf("valid slots hold %v, want both 10 and 11", seen)
				}
			})
		}
	}
}

// TestGenerationsOtherTPMRecord: a record copied over another TPM's does
// not decrypt (its key and additional data name the TPM).
func TestGenerationsOtherTPMRecord(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ks")
	a, b := uuid.New(), uuid.New()
	g := openFile(t, dir).Generations()
	for _, id := range []uuid.UUID{a, b} {
		if err := g.Record(id, "permall", 4); err != nil {
			t.Fatal(err)
		}
	}
	data, _ := os.ReadFile(filepath.Join(dir, genKind, a.String()))
	os.WriteFile(filepath.Join(dir, genKind, b.String()), data, 0o600)
	if _, err := g.Last(b, "permall"); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Last of a record copied from another TPM: %v, want ErrCorrupt", err)
	}
}

const pinnedEnv = "VTPM_KEYSTORE_TEST_PINNED"

// TestPinnedHelper pins a record as root, drops to uid/gid 65534 and then
// records; it runs in a child process of TestPinnedAfterDroppingPrivileges.
func TestPinnedHelper(t *testing.T) {
	spec := os.Getenv(pinnedEnv)
	if spec == "" {
		t.Skip("helper process only")
	}
	var dir, ids string
	if _, err := fmt.Sscan(spec, &dir, &ids); err != nil {
		t.Fatalf("bad %s=%q: %v", pinnedEnv, spec, err)
	}
	id := uuid.MustParse(ids)
	k, err := Open(dir, quietOpts("none"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := k.Generations().Pin(id)
	if err != nil {
		t.Fatal(err)
	}
	k.Close()
	const nobody = 65534
	if err := syscall.Setgroups([]int{nobody}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Setgid(nobody); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Setuid(nobody); err != nil {
		t.Fatal(err)
	}
	if os.Getuid() != nobody || os.Geteuid() != nobody {
		t.Fatalf("still uid %d/%d after setuid", os.Getuid(), os.Geteuid())
	}
	// The keystore itself is out of reach now...
	if _, err := Open(dir, quietOpts("none")); !errors.Is(err, ErrPermission) {
		t.Fatalf("Open as uid %d: %v, want ErrPermission", nobody, err)
	}
	// ...but the pinned record is not.
	for _, gen := range []uint64{3, 9, 4} {
		if err := p.Record(id, "permall", gen); err != nil {
			t.Fatalf("Record(%d) as uid %d: %v", gen, nobody, err)
		}
	}
	if got, err := p.Last(id, "permall"); err != nil || got != 9 {
		t.Fatalf("Last as uid %d = %d, %v; want 9", nobody, got, err)
	}
	os.Stdout.WriteString("RECORDED AS UID " + strconv.Itoa(os.Getuid()) + "\n")
}

func TestPinnedAfterDroppingPrivileges(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "needs root to drop privileges")
	}
	for _, existing := range []bool{false, true} {
		t.Run(fmt.Sprintf("existing=%v", existing), func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ks")
			id := uuid.New()
			if existing {
				if err := openFile(t, dir).Generations().Record(id, "volatilestate", 2); err != nil {
					t.Fatal(err)
				}
			}
			cmd := exec.Command(os.Args[0], "-test.run=^TestPinnedHelper$", "-test.count=1", "-test.v")
			cmd.Env = append(os.Environ(), pinnedEnv+"="+dir+" "+id.String())
			out, err := cmd.CombinedOutput()
			if err != nil || !bytes.Contains(out, []byte("RECORDED AS UID 65534")) {
				t.Fatalf("helper: %v\n%s", err, out)
			}
			g := openFile(t, dir).Generations()
			want := map[string]uint64{"permall": 9}
			if existing {
				want["volatilestate"] = 2
			}
			for name, w := range want {
				if got, err := g.Last(id, name); err != nil || got != w {
					t.Errorf("Last(%s) = %d, %v; want %d", name, got, err, w)
				}
			}
			// The record stays root's and private.
			st, err := os.Stat(filepath.Join(dir, genKind, id.String()))
			if err != nil {
				t.Fatal(err)
			}
			if s := st.Sys().(*syscall.Stat_t); s.Uid != 0 || st.Mode().Perm() != 0o600 {
				t.Errorf("record is uid %d mode %04o, want 0 and 0600", s.Uid, st.Mode().Perm())
			}
		})
	}
}
