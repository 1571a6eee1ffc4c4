package state

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/seal"
)

var testKey = bytes.Repeat([]byte{0x42}, 32)

// fixedKeys hands out one data key for every TPM, as --data-key does.
type fixedKeys struct{ dek []byte }

func (k fixedKeys) OpenKey(dir string) (uuid.UUID, SealKey, error) {
	id, err := seal.Identify(dir)
	return id, rawKey(bytes.Clone(k.dek)), err
}

// rawKey is a test key held in plain memory.
type rawKey []byte

func (k rawKey) OpenStore(dir string, opts seal.Options) (*seal.Store, error) {
	opts.Key = k
	return seal.Open(dir, opts)
}

func (k rawKey) Close() { clear(k) }

func (fixedKeys) Generations() seal.Generations { return nil }

func touch(t *testing.T, dir string, names ...string) {
	t.Helper()
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// sealed makes dir sealed state: its identity, and a blob unless empty.
func sealed(t *testing.T, dir string, blob bool) {
	t.Helper()
	o, err := OpenSealed(fixedKeys{testKey}, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if blob {
		if err := o.Storage.Store("permall", []byte("state")); err != nil {
			t.Fatal(err)
		}
	}
}

func TestChoose(t *testing.T) {
	tests := []struct {
		name     string
		setup    func(t *testing.T, dir string)
		linear   bool // swtpm's linear file: no directory
		swtpmKey bool
		want     Format
	}{
		{"new directory", func(*testing.T, string) {}, false, false, Sealed},
		{"new directory with a swtpm key", func(*testing.T, string) {}, false, true, Swtpm},
		{"swtpm state", func(t *testing.T, d string) { touch(t, d, "tpm2-00.permall") }, false, false, Swtpm},
		{"sealed state", func(t *testing.T, d string) { sealed(t, d, true) }, false, false, Sealed},
		{"sealed state stays sealed with a swtpm key", func(t *testing.T, d string) { sealed(t, d, true) }, false, true, Sealed},
		{"sealed identity without blobs", func(t *testing.T, d string) { sealed(t, d, false) }, false, false, Sealed},
		{"both formats: an interrupted import is complete once sealed", func(t *testing.T, d string) {
			touch(t, d, "tpm2-00.permall")
			sealed(t, d, true)
		}, false, false, Sealed},
		{"swtpm's linear file", func(*testing.T, string) {}, true, false, Swtpm},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tt.setup(t, dir)
			if tt.linear {
				dir = ""
			}
			if got := Choose(dir, tt.swtpmKey); got != tt.want {
				t.Errorf("Choose = %s, want %s", got, tt.want)
			}
		})
	}
}

func TestDetect(t *testing.T) {
	tests := []struct {
		name                      string
		setup                     func(t *testing.T, dir string)
		hasState, sealed, isSwtpm bool
	}{
		{"empty", func(*testing.T, string) {}, false, false, false},
		{"swtpm state", func(t *testing.T, d string) { touch(t, d, "tpm2-00.permall") }, true, false, true},
		{"swtpm volatile state only", func(t *testing.T, d string) { touch(t, d, "tpm2-00.volatilestate") }, false, false, false},
		{"sealed identity only", func(t *testing.T, d string) { sealed(t, d, false) }, false, true, false},
		{"sealed state", func(t *testing.T, d string) { sealed(t, d, true) }, true, true, false},
		{"sealed blob without identity", func(t *testing.T, d string) { touch(t, d, "permall.b.sealed") }, true, false, false},
		{"protector only", func(t *testing.T, d string) { touch(t, d, ProtectorFile) }, false, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tt.setup(t, dir)
			if got := HasState(dir); got != tt.hasState {
				t.Errorf("HasState = %v, want %v", got, tt.hasState)
			}
			if got := IsSealed(dir); got != tt.sealed {
				t.Errorf("IsSealed = %v, want %v", got, tt.sealed)
			}
			if got := IsSwtpm(dir); got != tt.isSwtpm {
				t.Errorf("IsSwtpm = %v, want %v", got, tt.isSwtpm)
			}
		})
	}
}

func TestIsStateFile(t *testing.T) {
	tests := []struct {
		name  string
		state bool
	}{
		{"vtpm-state.json", true},
		{"protector.json", true},
		{"permall.a.sealed", true},
		{"volatilestate.b.sealed", true},
		{"savestate.a.sealed.tmp", true},
		{"permall.sealed", true},
		{"permall.sealed.prev", true},
		{"permall.sealed.tmp", true},
		{"tpm2-00.permall", true},
		{"tpm2-00.volatilestate", true},
		{"tpm2-00.savestate", true},
		{".lock", false},
		{"policy.json", false},
		{"notes.txt", false},
		{"backup-20260101T000000Z", false},
		{"swtpm-backup-20260101T000000Z", false},
		{"permall", false},
		{"tpm2-00.other", false},
	}
	for _, tt := range tests {
		if got := IsStateFile(tt.name); got != tt.state {
			t.Errorf("IsStateFile(%q) = %v, want %v", tt.name, got, tt.state)
		}
	}
}

func TestRemoveKeepsOtherFiles(t *testing.T) {
	tests := []struct {
		name   string
		remove func(t *testing.T, dir string) error
	}{
		{"without the lock", func(t *testing.T, dir string) error { return Remove(dir) }},
		{"under the lock", func(t *testing.T, dir string) error {
			l, err := Lock(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Unlock()
			return l.Remove()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			state := []string{"permall.sealed", "permall.sealed.prev", "permall.a.sealed", "volatilestate.b.sealed", "tpm2-00.permall", "tpm2-00.volatilestate", "vtpm-state.json", "protector.json"}
			other := []string{"policy.json", ".lock", "notes.txt", "backup-20260101T000000Z"}
			touch(t, dir, append(slices.Clone(state), other...)...)
			if err := tt.remove(t, dir); err != nil {
				t.Fatal(err)
			}
			for _, n := range state {
				if _, err := os.Stat(filepath.Join(dir, n)); err == nil {
					t.Errorf("%s was not removed", n)
				}
			}
			for _, n := range other {
				if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
					t.Errorf("%s was removed: %v", n, err)
				}
			}
		})
	}
}

// TestRemoveRunningTPM: Remove takes the lock before it removes anything,
// so a directory a TPM process holds keeps every file.
func TestRemoveRunningTPM(t *testing.T) {
	dir := t.TempDir()
	files := []string{"permall.a.sealed", "permall.b.sealed", "vtpm-state.json", "protector.json"}
	touch(t, dir, files...)
	l, err := Lock(dir) // as the serving TPM process holds it
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	if err := Remove(dir); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("Remove of a locked directory = %v; want ErrLocked, nothing changed", err)
	}
	for _, n := range files {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			t.Errorf("%s was removed from a locked directory: %v", n, err)
		}
	}
}

func TestRemoveMissingDirectory(t *testing.T) {
	if err := Remove(filepath.Join(t.TempDir(), "absent")); err != nil {
		t.Errorf("Remove of a missing directory = %v, want nil", err)
	}
}

func TestLockExcludes(t *testing.T) {
	dir := t.TempDir()
	l, err := Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	if l.Dir() != dir {
		t.Errorf("Dir = %q, want %q", l.Dir(), dir)
	}
	tests := []struct {
		name string
		open func() (func() error, error)
	}{
		{"lock", func() (func() error, error) {
			l, err := Lock(dir)
			if err != nil {
				return nil, err
			}
			return l.Unlock, nil
		}},
		{"open sealed", func() (func() error, error) {
			o, err := OpenSealed(fixedKeys{testKey}, dir, nil)
			if err != nil {
				return nil, err
			}
			return o.Close, nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			closeIt, err := tt.open()
			if err == nil {
				closeIt()
				t.Fatal("succeeded on a locked directory")
			}
			if !errors.Is(err, ErrLocked) || !errors.Is(err, errdefs.ErrFailedPrecondition) {
				t.Errorf("error %v; want ErrLocked, of kind %v", err, errdefs.ErrFailedPrecondition)
			}
		})
	}
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	l2, err := Lock(dir)
	if err != nil {
		t.Fatalf("Lock after Unlock: %v", err)
	}
	l2.Unlock()
}

func TestMoveAside(t *testing.T) {
	tests := []struct {
		name    string
		names   []string
		exists  bool // the backup directory is there already
		wantErr string
		moved   []string // in the backup afterwards
	}{
		{name: "moves the named files", names: []string{"tpm2-00.permall", "tpm2-00.volatilestate"}, moved: []string{"tpm2-00.permall", "tpm2-00.volatilestate"}},
		{name: "nothing to move", moved: []string{}},
		{name: "a missing file stops it; nothing is deleted", names: []string{"tpm2-00.permall", "absent", "tpm2-00.volatilestate"},
			wantErr: "move absent into", moved: []string{"tpm2-00.permall"}},
		{name: "an existing backup is never reused", names: []string{"tpm2-00.permall"}, exists: true, wantErr: "create backup directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			touch(t, dir, "tpm2-00.permall", "tpm2-00.volatilestate", "notes.txt")
			sub := "swtpm-backup-" + Stamp(time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC))
			if tt.exists {
				if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil {
					t.Fatal(err)
				}
			}
			b, err := MoveAside(dir, sub, tt.names)
			if tt.wantErr == "" && err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("MoveAside = %v, want an error saying %q", err, tt.wantErr)
			}
			if tt.moved == nil {
				if b != "" {
					t.Errorf("MoveAside returned %q for a backup it did not make", b)
				}
				return
			}
			if want := filepath.Join(dir, "swtpm-backup-20250304T050607Z"); b != want {
				t.Fatalf("backup = %q, want %q", b, want)
			}
			entries, err := os.ReadDir(b)
			if err != nil {
				t.Fatal(err)
			}
			got := []string{}
			for _, e := range entries {
				got = append(got, e.Name())
			}
			if !slices.Equal(got, tt.moved) {
				t.Errorf("backup holds %v, want %v", got, tt.moved)
			}
			if _, err := os.Stat(filepath.Join(dir, "notes.txt")); err != nil {
				t.Errorf("a file not named was moved: %v", err)
			}
		})
	}
}

func TestOpenSealed(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tpm")
	o, err := OpenSealed(fixedKeys{testKey}, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := seal.Identify(dir)
	if err != nil {
		t.Fatal(err)
	}
	if o.Format != Sealed || o.TPM != id || o.Store == nil {
		t.Errorf("opened %+v; want sealed state of TPM %s", o, id)
	}
	if err := o.Check(); err != nil {
		t.Errorf("Check of a new TPM: %v", err)
	}
	if err := o.Storage.Store("permall", []byte("state")); err != nil {
		t.Fatal(err)
	}
	o.Close()
	list, err := ListSealed(dir)
	if err != nil || !slices.Equal(list, []StateInfo{{Name: "permall", Size: 5}}) {
		t.Errorf("ListSealed = %v, %v; want permall of 5 bytes", list, err)
	}

	o, err = OpenSealed(fixedKeys{bytes.Repeat([]byte{0x24}, 32)}, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	err = o.Check()
	if err == nil || !strings.Contains(err.Error(), "cannot be opened; nothing was changed") || !errors.Is(err, seal.ErrAuth) {
		t.Errorf("Check under another key = %v; want a refusal matching seal.ErrAuth", err)
	}
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Errorf("Check under another key = %v; want kind %v", err, errdefs.ErrDataLoss)
	}
}

func TestOpenSwtpm(t *testing.T) {
	tests := []struct {
		name string
		open func(t *testing.T, where string) (*Opened, error)
	}{
		{"directory", func(t *testing.T, where string) (*Opened, error) { return OpenSwtpm(where, nil, 0o600) }},
		{"linear file", func(t *testing.T, where string) (*Opened, error) {
			if err := os.WriteFile(where, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return OpenSwtpmFile(where, nil, 0o600)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			where := filepath.Join(t.TempDir(), "tpm")
			o, err := tt.open(t, where)
			if err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			if o.Format != Swtpm || o.Store != nil || o.TPM == uuid.Nil {
				t.Errorf("opened %+v; want swtpm's format with a random TPM UUID", o)
			}
			if err := o.Check(); err != nil {
				t.Errorf("Check: %v", err)
			}
			if err := o.Storage.Store("permall", []byte("state")); err != nil {
				t.Fatal(err)
			}
			got, err := o.Storage.Load("permall")
			if err != nil || string(got) != "state" {
				t.Errorf("Load = %q, %v; want what was stored", got, err)
			}
			list, err := o.States()
			if err != nil || len(list) != 1 || list[0].Name != "permall" {
				t.Errorf("States = %v, %v; want permall", list, err)
			}
		})
	}
}

func TestStamp(t *testing.T) {
	at := time.Date(2025, 3, 4, 5, 6, 7, 0, time.FixedZone("CET", 3600))
	if got, want := Stamp(at), "20250304T040607Z"; got != want {
		t.Errorf("Stamp = %q, want %q", got, want)
	}
}
