package statefile

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"vtpm/internal/tpmrc"
)

func TestLinearStoreLoadDelete(t *testing.T) {
	p := filepath.Join(t.TempDir(), "state")
	l, err := OpenLinear(p, key256, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	small, big, vol := testPlain(100), testPlain(5000), testPlain(300)
	steps := []struct {
		name string
		data []byte
	}{
		{"permall", small},
		{"volatilestate", vol},
		{"permall", big}, // outgrows its section and moves to the end
	}
	for _, s := range steps {
		if err := l.Store(s.name, s.data); err != nil {
			t.Fatalf("Store(%s): %v", s.name, err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	raw, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw[:12], []byte{'n', 'i', 'l', 'm', 'p', 't', 'w', 's', 1, 0, 192, 0}) {
		t.Fatalf("header % x", raw[:12])
	}
	if m := fileMode(t, p); m != 0o600 {
		t.Errorf("mode %o, want 600", m)
	}

	l, _ = OpenLinear(p, key256, 0o600)
	defer l.Close()
	for name, want := range map[string][]byte{"permall": big, "volatilestate": vol} {
		if got, err := l.Load(name); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("Load(%s) after reopen: %v", name, err)
		}
	}
	if _, err := l.Load("savestate"); !errors.Is(err, fs.ErrNotExist) || tpmrc.Of(err) != tpmrc.TPMRetry {
		t.Fatalf("Load of missing state: %v", err)
	}

	// Deleting the last section shrinks the file.
	if err := l.Delete("permall", true); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(p)
	if e := l.entries[1]; fi.Size() != int64(e.end()) {
		t.Fatalf("file is %d bytes after delete, want %d", fi.Size(), e.end())
	}
	if err := l.Delete("permall", true); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("second Delete with mustExist: %v", err)
	}
	st, _ := l.States()
	if len(st) != 1 || st[0].Name != "volatilestate" {
		t.Fatalf("States = %v", st)
	}
}

func TestLinearRejectsForeignFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "state")
	os.WriteFile(p, bytes.Repeat([]byte{1}, 300), 0o600)
	l, _ := OpenLinear(p, nil, 0)
	if err := l.Init(); err == nil || !strings.Contains(err.Error(), "bad magic") {
		t.Fatalf("Init on a foreign file: %v", err)
	}
}

func TestOpenBackendURI(t *testing.T) {
	dir := t.TempDir()
	if s, err := OpenBackendURI("dir://"+dir, nil, 0); err != nil {
		t.Errorf("dir://: %v", err)
	} else if _, ok := s.(*Dir); !ok {
		t.Errorf("dir:// gave %T", s)
	}
	if s, err := OpenBackendURI("file://"+filepath.Join(dir, "f"), nil, 0); err != nil {
		t.Errorf("file://: %v", err)
	} else if _, ok := s.(*Linear); !ok {
		t.Errorf("file:// gave %T", s)
	}
	if _, err := OpenBackendURI("http://x", nil, 0); err == nil {
		t.Error("http:// accepted")
	}
}

func TestLinearInteropWithSwtpm(t *testing.T) {
	requireSwtpm(t)
	for _, kc := range []keyCase{keyCases[0], keyCases[2]} {
		t.Run(kc.name, func(t *testing.T) {
			args, key := kc.materialize(t, "--key")
			nv := randomNV(t)

			// swtpm writes, we read.
			dir := shortTempDir(t)
			file := filepath.Join(dir, "linear")
			sw := startSwtpm(t, dir, true, append([]string{"--tpmstate", "backend-uri=file://" + file}, args...)...)
			nvDefineWrite(t, sw.dial(t), nv)
			sw.shutdown(t)
			l, err := OpenLinear(file, key, 0)
			if err != nil {
				t.Fatal(err)
			}
			plain, err := l.Load("permall")
			if err != nil {
				t.Fatalf("Load from swtpm's linear file: %v", err)
			}
			if !bytes.Contains(plain, nv) {
				t.Fatal("permall from swtpm's linear file lacks the NV data")
			}
			st, _ := l.States()
			l.Close()
			out, err := exec.Command("swtpm", "socket", "--tpm2", "--print-states", "--tpmstate", "backend-uri=file://"+file).Output()
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range st {
				if want := `{"name": "` + s.Name + `", "size": ` + strconv.FormatInt(s.Size, 10) + `}`; !strings.Contains(string(out), want) {
					t.Errorf("swtpm --print-states %s lacks %s", out, want)
				}
			}

			// We write a fresh file, swtpm reads.
			file2 := filepath.Join(dir, "ours")
			l2, _ := OpenLinear(file2, key, 0)
			if err := l2.Store("permall", plain); err != nil {
				t.Fatal(err)
			}
			l2.Close()
			raw, _ := os.ReadFile(file2)
			if got := binary.LittleEndian.Uint32(raw[12:]); got != linearHeaderSize {
				t.Fatalf("permall section at %d, want %d", got, linearHeaderSize)
			}
			dir2 := shortTempDir(t)
			sw2 := startSwtpm(t, dir2, true, append([]string{"--tpmstate", "backend-uri=file://" + file2}, args...)...)
			if got := nvRead(t, sw2.dial(t), len(nv)); !bytes.Equal(got, nv) {
				t.Fatalf("swtpm read NV %x from our linear file, want %x", got, nv)
			}
			sw2.shutdown(t)
		})
	}
}
