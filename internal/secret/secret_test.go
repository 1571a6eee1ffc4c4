package secret

import (
	"bufio"
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"

	"vtpm/internal/testutil"
)

// vmLck is this process's locked memory, as /proc/self/status reports it.
func vmLck(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		testutil.Missing(t, "no /proc/self/status: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmLck:"); ok {
			return strings.TrimSpace(v)
		}
	}
	testutil.Missing(t, "no VmLck in /proc/self/status")
	return ""
}

func TestCloseWipesBeforeUnmapping(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func() (*Bytes, error)
	}{
		{"New", func() (*Bytes, error) {
			s, err := New(32)
			if err == nil {
				copy(s.Bytes(), bytes.Repeat([]byte{0xa5}, 32))
			}
			return s, err
		}},
		{"From", func() (*Bytes, error) { return From(bytes.Repeat([]byte{0x5a}, 48)) }},
		{"Random", func() (*Bytes, error) { return Random(64) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := tc.make()
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Count(s.Bytes(), []byte{0}) == s.Len() {
				t.Fatal("key memory holds only zeros before Close")
			}
			var atUnmap []byte
			orig := unmap
			unmap = func(b []byte) error {
				atUnmap = bytes.Clone(b)
				return orig(b)
			}
			defer func() { unmap = orig }()
			s.Close()
			if atUnmap == nil {
				t.Fatal("Close did not unmap the key memory")
			}
			if !bytes.Equal(atUnmap, make([]byte, len(atUnmap))) {
				t.Fatalf("key memory was unmapped without being wiped: %x", atUnmap)
			}
			if s.Bytes() != nil || s.Len() != 0 {
				t.Error("Bytes is still reachable after Close")
			}
			s.Close() // twice is fine
		})
	}
}

func TestFromWipesSource(t *testing.T) {
	src := bytes.Repeat([]byte{7}, 32)
	s, err := From(src)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !bytes.Equal(src, make([]byte, 32)) {
		t.Errorf("From left the source key in place: %x", src)
	}
	if !bytes.Equal(s.Bytes(), bytes.Repeat([]byte{7}, 32)) {
		t.Errorf("From copied %x", s.Bytes())
	}
}

func TestLockedWhileOpen(t *testing.T) {
	before := vmLck(t)
	s, err := New(32)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.LockErr(); err != nil {
		testutil.Missing(t, "cannot lock memory here: %v", err)
	}
	if during := vmLck(t); during == before {
		t.Errorf("VmLck stays %s with a locked page", during)
	}
	s.Close()
	if after := vmLck(t); after != before {
		t.Errorf("VmLck is %s after Close, was %s before", after, before)
	}
}

func TestNilAndBadSize(t *testing.T) {
	var s *Bytes
	s.Close()
	if s.Bytes() != nil || s.Len() != 0 || s.LockErr() != nil {
		t.Error("a nil Bytes holds something")
	}
	for _, n := range []int{0, -1} {
		if _, err := New(n); err == nil {
			t.Errorf("New(%d) succeeded", n)
		}
	}
	if !errors.Is((&Bytes{lockErr: errors.Join(ErrNotLocked)}).LockErr(), ErrNotLocked) {
		t.Error("LockErr does not wrap ErrNotLocked")
	}
}
