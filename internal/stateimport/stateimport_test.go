package stateimport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/libtpms"
	"vtpm/internal/seal"
	"vtpm/internal/state"
	"vtpm/internal/swtpm/statefile"
	"vtpm/internal/testutil"
)

var (
	dataKey = bytes.Repeat([]byte{0x42}, 32)
	key256  = &statefile.Key{Bytes: bytes.Repeat([]byte{0x17}, 32)}
	key128  = &statefile.Key{Bytes: bytes.Repeat([]byte{0x71}, 16)}
	now     = time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)
)

// tpmStates manufactures a TPM with libtpms once and returns its permanent
// and volatile state, as swtpm would have stored them (decrypted).
var tpmStates = sync.OnceValues(func() (map[string][]byte, error) {
	validateMu.Lock() // libtpms hosts one TPM per process
	defer validateMu.Unlock()
	m := mem{}
	tpm, err := libtpms.Open(m)
	if err != nil {
		return nil, err
	}
	defer tpm.Close()
	if err := tpm.Init(); err != nil {
		return nil, err
	}
	startup := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0}
	if rsp, err := tpm.Process(startup); err != nil || binary.BigEndian.Uint32(rsp[6:]) != 0 {
		return nil, errors.Join(errors.New("TPM2_Startup failed"), err)
	}
	vol, err := tpm.VolatileAllStore()
	if err != nil {
		return nil, err
	}
	perm, err := tpm.GetState(libtpms.Permanent)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{"permall": perm, "volatilestate": vol}, nil
})

type mem map[string][]byte

func (m mem) Init() error { return nil }
func (m mem) Load(name string) ([]byte, error) {
	b, ok := m[name]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return slices.Clone(b), nil
}
func (m mem) Store(name string, data []byte) error     { m[name] = slices.Clone(data); return nil }
func (m mem) Delete(name string, mustExist bool) error { delete(m, name); return nil }

// writeSwtpm writes the states into dir as swtpm's files, encrypted with key.
func writeSwtpm(t *testing.T, dir string, key *statefile.Key, names ...string) map[string][]byte {
	t.Helper()
	states, err := tpmStates()
	if err != nil {
		t.Fatalf("manufacture a TPM: %v", err)
	}
	for _, n := range names {
		enc, err := statefile.EncodeFile(states[n], key)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, swtpmFile(n)), enc, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return states
}

// tree maps every file under dir to its contents.
func tree(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		files[rel] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// loadSealed opens dir as vtpm does and returns the blobs it holds.
func loadSealed(t *testing.T, dir string, gens seal.Generations) map[string][]byte {
	t.Helper()
	s, err := seal.Open(dir, seal.Options{Key: dataKey, Generations: gens})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	out := map[string][]byte{}
	for _, n := range seal.Names {
		b, err := s.Load(n)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatalf("load sealed %s: %v", n, err)
		}
		out[n] = b
	}
	return out
}

func TestImport(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		key    *statefile.Key
		names  []string
		toDest bool
	}{
		{name: "plain permall", names: []string{"permall"}},
		{name: "plain permall and volatile", names: []string{"permall", "volatilestate"}},
		{name: "aes-256", key: key256, names: []string{"permall", "volatilestate"}},
		{name: "aes-128", key: key128, names: []string{"permall"}},
		{name: "into another directory", key: key256, names: []string{"permall", "volatilestate"}, toDest: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := t.TempDir()
			states := writeSwtpm(t, src, tc.key, tc.names...)
			before := tree(t, src)
			gens := seal.NewFileGenerations(t.TempDir())
			opts := Options{Source: src, FileKey: tc.key, DataKey: fixedKey(t, dataKey), Generations: gens, Now: func() time.Time { return now }}
			dest := src
			if tc.toDest {
				dest = filepath.Join(t.TempDir(), "new", "sealed")
				opts.Dest = dest
			}
			res, err := Import(opts)
			if err != nil {
				t.Fatalf("Import: %v", err)
			}
			if !slices.Equal(res.States, tc.names) || res.Dest != dest {
				t.Errorf("Result = %+v; want states %v in %s", res, tc.names, dest)
			}

			got := loadSealed(t, dest, gens)
			if len(got) != len(tc.names) {
				t.Errorf("sealed state holds %v, want %v", slices.Sorted(maps.Keys(got)), tc.names)
			}
			for _, n := range tc.names {
				if !bytes.Equal(got[n], states[n]) {
					t.Errorf("sealed %s differs from the swtpm state", n)
				}
				if g, err := gens.Last(res.UUID, n); err != nil || g != 1 {
					t.Errorf("generation recorded for %s: %d, %v; want 1", n, g, err)
				}
			}

			after := tree(t, src)
			wantBackup := ""
			if !tc.toDest {
				wantBackup = filepath.Join(src, "swtpm-backup-20250304T050607Z")
			}
			if res.Backup != wantBackup {
				t.Errorf("Backup = %q, want %q", res.Backup, wantBackup)
			}
			for name, b := range before {
				moved := name
				if !tc.toDest && strings.HasPrefix(name, "tpm2-00.") {
					moved = filepath.Join(filepath.Base(wantBackup), name)
					if _, ok := after[name]; ok {
						t.Errorf("%s is still in place", name)
					}
				}
				if !bytes.Equal(after[moved], b) {
					t.Errorf("%s: not kept byte for byte as %s", name, moved)
				}
			}
			for name := range after {
				if strings.HasPrefix(name, stagingPrefix) {
					t.Errorf("staging file %s left behind", name)
				}
			}
		})
	}
}

func TestImportRefuses(t *testing.T) {
	t.Parallel()
	garbage := func(t *testing.T, dir string) {
		enc, _ := statefile.EncodeFile([]byte("this is not a TPM state"), nil)
		os.WriteFile(filepath.Join(dir, swtpmFile("permall")), enc, 0o640)
	}
	tests := []struct {
		name    string
		setup   func(t *testing.T, src, dest string)
		key     *statefile.Key
		dataKey []byte
		inPlace bool
		wantErr []string
		kind    error  // the errdefs kind of the refusal
		remedy  string // a remedy it offers, as prose
	}{
		{
			name:    "empty directory",
			kind:    errdefs.ErrNotFound,
			setup:   func(t *testing.T, src, dest string) {},
			wantErr: []string{"holds no swtpm TPM 2 state", "tpm2-00.permall is missing"},
		},
		{
			name:    "only volatile state",
			kind:    errdefs.ErrNotFound,
			setup:   func(t *testing.T, src, dest string) { writeSwtpm(t, src, nil, "volatilestate") },
			wantErr: []string{"holds no swtpm TPM 2 state"},
		},
		{
			name:    "wrong key",
			kind:    errdefs.ErrInvalidArgument,
			setup:   func(t *testing.T, src, dest string) { writeSwtpm(t, src, key256, "permall") },
			key:     &statefile.Key{Bytes: bytes.Repeat([]byte{0x18}, 32)},
			wantErr: []string{"tpm2-00.permall: decrypt failed: wrong --key?", "TPM_DECRYPT_ERROR"},
		},
		{
			name:    "wrong key size",
			kind:    errdefs.ErrInvalidArgument,
			setup:   func(t *testing.T, src, dest string) { writeSwtpm(t, src, key256, "permall") },
			key:     key128,
			wantErr: []string{"tpm2-00.permall: decrypt failed: wrong --key?", "256-bit"},
		},
		{
			name: "wrong key for the volatile state only",
			kind: errdefs.ErrInvalidArgument,
			setup: func(t *testing.T, src, dest string) {
				writeSwtpm(t, src, key256, "permall")
				writeSwtpm(t, src, &statefile.Key{Bytes: bytes.Repeat([]byte{0x18}, 32)}, "volatilestate")
			},
			key:     key256,
			wantErr: []string{"tpm2-00.volatilestate: decrypt failed: wrong --key?"},
		},
		{
			name:    "encrypted without key",
			kind:    errdefs.ErrInvalidArgument,
			setup:   func(t *testing.T, src, dest string) { writeSwtpm(t, src, key128, "permall") },
			wantErr: []string{"tpm2-00.permall is encrypted: give the --key"},
		},
		{
			name:    "plain with key",
			kind:    errdefs.ErrInvalidArgument,
			setup:   func(t *testing.T, src, dest string) { writeSwtpm(t, src, nil, "permall") },
			key:     key256,
			wantErr: []string{"tpm2-00.permall is not encrypted, but --key was given"},
		},
		{
			name:    "not a TPM state",
			kind:    errdefs.ErrDataLoss,
			setup:   func(t *testing.T, src, dest string) { garbage(t, src) },
			wantErr: []string{"does not hold a usable TPM 2 state", "nothing was changed"},
		},
		{
			name:   "destination holds sealed state",
			kind:   errdefs.ErrAlreadyExists,
			remedy: "move it away, or import into another directory with --dest",
			setup: func(t *testing.T, src, dest string) {
				writeSwtpm(t, src, nil, "permall")
				s, err := seal.Open(dest, seal.Options{Key: dataKey})
				if err != nil {
					t.Fatal(err)
				}
				s.Store("permall", []byte("another TPM"))
				s.Close()
			},
			wantErr: []string{"already holds vtpm sealed state", "never overwrites"},
		},
		{
			name:   "in place over sealed state",
			kind:   errdefs.ErrAlreadyExists,
			remedy: "move it away, or import into another directory with --dest",
			setup: func(t *testing.T, src, dest string) {
				writeSwtpm(t, src, nil, "permall")
				s, err := seal.Open(src, seal.Options{Key: dataKey})
				if err != nil {
					t.Fatal(err)
				}
				s.Close()
			},
			inPlace: true,
			wantErr: []string{"already holds vtpm sealed state"},
		},
		{
			name:   "destination holds a sealed blob without its state file",
			kind:   errdefs.ErrAlreadyExists,
			remedy: "move it away first",
			setup: func(t *testing.T, src, dest string) {
				writeSwtpm(t, src, nil, "permall")
				os.WriteFile(filepath.Join(dest, "permall.sealed.prev"), []byte("old"), 0o600)
			},
			wantErr: []string{"holds sealed blob permall.sealed.prev", "never overwrites"},
		},
		{
			name:   "destination holds a sealed slot without its state file",
			kind:   errdefs.ErrAlreadyExists,
			remedy: "move it away first",
			setup: func(t *testing.T, src, dest string) {
				writeSwtpm(t, src, nil, "permall")
				os.WriteFile(filepath.Join(dest, "volatilestate.b.sealed"), []byte("old"), 0o600)
			},
			wantErr: []string{"holds sealed blob volatilestate.b.sealed", "never overwrites"},
		},
		{
			name:   "destination holds another swtpm state",
			kind:   errdefs.ErrAlreadyExists,
			remedy: "import into an empty directory, or import that one in place",
			setup: func(t *testing.T, src, dest string) {
				writeSwtpm(t, src, nil, "permall")
				writeSwtpm(t, dest, nil, "permall")
			},
			wantErr: []string{"holds swtpm state of its own"},
		},
		{
			name: "source in use",
			kind: errdefs.ErrFailedPrecondition, remedy: "stop it first",
			setup: func(t *testing.T, src, dest string) {
				writeSwtpm(t, src, nil, "permall")
				holdLock(t, src)
			},
			wantErr: []string{"another TPM process is using this state directory"},
		},
		{
			name: "destination in use",
			kind: errdefs.ErrFailedPrecondition, remedy: "stop it first",
			setup: func(t *testing.T, src, dest string) {
				writeSwtpm(t, src, nil, "permall")
				holdLock(t, dest)
			},
			wantErr: []string{"another TPM process is using this state directory"},
		},
		{
			name:    "bad data key",
			kind:    errdefs.ErrInvalidArgument,
			setup:   func(t *testing.T, src, dest string) { writeSwtpm(t, src, nil, "permall") },
			dataKey: []byte("short"),
			wantErr: []string{"binary key has 5 bytes, want 32"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src, dest := t.TempDir(), t.TempDir()
			tc.setup(t, src, dest)
			srcBefore, destBefore := tree(t, src), tree(t, dest)
			dk := tc.dataKey
			if dk == nil {
				dk = dataKey
			}
			d := dest
			if tc.inPlace {
				d = ""
			}
			res, err := Import(Options{Source: src, Dest: d, FileKey: tc.key, DataKey: fixedKey(t, dk), Now: func() time.Time { return now }})
			if err == nil {
				t.Fatalf("Import succeeded: %+v", res)
			}
			for _, want := range tc.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
			if k := errdefs.KindOf(err); k != tc.kind {
				t.Errorf("error %q is of kind %v, want %v", err, k, tc.kind)
			}
			if tc.remedy != "" && !slices.ContainsFunc(errdefs.Remedies(err), errdefs.Advise("%s", tc.remedy).Equal) {
				t.Errorf("error %q does not offer the remedy %q: %+v", err, tc.remedy, errdefs.Remedies(err))
			}
			if strings.Contains(err.Error(), "`vtpm ") {
				t.Errorf("error %q names a vtpm command; remedies are data", err)
			}
			// Only the lock file may appear: nothing else is created,
			// changed or removed.
			for dir, before := range map[string]map[string][]byte{src: srcBefore, dest: destBefore} {
				after := tree(t, dir)
				delete(after, seal.LockName)
				delete(before, seal.LockName)
				if !maps.EqualFunc(before, after, bytes.Equal) {
					t.Errorf("a refused import changed %s: before %v, after %v", dir, slices.Sorted(maps.Keys(before)), slices.Sorted(maps.Keys(after)))
				}
			}
		})
	}
}

func TestImportMissingSource(t *testing.T) {
	t.Parallel()
	_, err := Import(Options{Source: filepath.Join(t.TempDir(), "absent"), DataKey: fixedKey(t, dataKey)})
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Import of a missing directory: %v, want fs.ErrNotExist", err)
	}
}

// TestImportKeepsOwner: root imports the state of a swtpm that ran as
// another user (libvirt uses tss); the vtpm replacing it runs as that user
// and must be able to open what was imported.
func TestImportKeepsOwner(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		testutil.Missing(t, "needs root to hand files to another user")
	}
	const uid, gid = 65534, 65534
	for _, toDest := range []bool{false, true} {
		src := t.TempDir()
		writeSwtpm(t, src, nil, "permall", "volatilestate")
		for _, p := range []string{src, filepath.Join(src, "tpm2-00.permall")} {
			if err := os.Chown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
		opts := Options{Source: src, DataKey: fixedKey(t, dataKey)}
		if toDest {
			opts.Dest = filepath.Join(t.TempDir(), "sealed")
		}
		res, err := Import(opts)
		if err != nil {
			t.Fatal(err)
		}
		check := []string{seal.StateFileName, "permall.a.sealed", "volatilestate.a.sealed"}
		if toDest {
			check = append(check, ".", seal.LockName)
		} else {
			check = append(check, filepath.Base(res.Backup))
		}
		for _, name := range check {
			fi, err := os.Stat(filepath.Join(res.Dest, name))
			if err != nil {
				t.Fatal(err)
			}
			st := fi.Sys().(*syscall.Stat_t)
			if st.Uid != uid || st.Gid != gid {
				t.Errorf("dest %v: %s is owned by %d:%d, want %d:%d like the swtpm state", toDest, name, st.Uid, st.Gid, uid, gid)
			}
		}
	}
}

// holdLock holds dir's lock until the test ends, as a TPM process serving
// it would.
func holdLock(t *testing.T, dir string) {
	t.Helper()
	l, err := state.Lock(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Unlock() })
}

// fixedKey returns a DataKey source that hands out k, as --data-key
// file=…,format=binary reads it.
func fixedKey(t *testing.T, k []byte) func(string) (state.SealKey, error) {
	p := filepath.Join(t.TempDir(), "data-key")
	if err := os.WriteFile(p, k, 0o600); err != nil {
		t.Fatal(err)
	}
	return func(string) (state.SealKey, error) { return keybroker.ParseDataKey("file=" + p + ",format=binary") }
}
