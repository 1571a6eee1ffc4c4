package memtrim

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestCandidates(t *testing.T) {
	smaps := `00400000-00402000 r--p 00000000 fd:01 123 /usr/bin/vtpm
Rss:                   8 kB
Anonymous:             0 kB
00402000-007bc000 r-xp 00002000 fd:01 123 /usr/bin/vtpm
Size:               3816 kB
Rss:                3688 kB
Anonymous:             0 kB
00b8a000-00b8b000 r--p 00789000 fd:01 123 /usr/bin/vtpm
Rss:                   4 kB
Anonymous:             4 kB
00b8b000-00bca000 rw-p 0078a000 fd:01 123 /usr/bin/vtpm
Rss:                 256 kB
Anonymous:            64 kB
7f8976800000-7f89768c5000 r--p 00000000 fd:01 77 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
Rss:                   0 kB
Anonymous:             0 kB
7f8976cbd000-7f8976d92000 rw-p 00000000 00:00 0 
Rss:                 300 kB
Anonymous:           300 kB
7ffd1a5f2000-7ffd1a5f6000 r--p 00000000 00:00 0                          [vvar]
Rss:                   0 kB
Anonymous:             0 kB
7ffd1a5f6000-7ffd1a5f8000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
7f8977005000-7f8977052000 r-xp 00000000 fd:01 78 /usr/lib/libtpms.so.0.9.2
Rss:                 192 kB
Anonymous:       garbled
7f8977052000-7f8977058000 r--p 0004d000 fd:01 78 /usr/lib/libtpms.so.0.9.2
Rss:                  24 kB
`
	got, err := candidates(strings.NewReader(smaps))
	if err != nil {
		t.Fatal(err)
	}
	want := []Mapping{
		{Start: 0x400000, End: 0x402000, Path: "/usr/bin/vtpm", Rss: 8 << 10},
		{Start: 0x402000, End: 0x7bc000, Path: "/usr/bin/vtpm", Rss: 3688 << 10},
	}
	if len(got) != len(want) {
		t.Fatalf("candidates = %+v, want %+v (not: relocated, writable, empty, anonymous, vdso, unreadable or missing Anonymous)", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("candidate %d = %+v, want %+v", i, got[i], want[i])
		}
	}
}

// mapFile maps a file holding content with prot, privately.
func mapFile(t *testing.T, content []byte, prot int) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := unix.Mmap(int(f.Fd()), 0, len(content), prot, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// resident counts the pages of b that are mapped.
func resident(t *testing.T, b []byte) int {
	t.Helper()
	vec := make([]byte, (len(b)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

func TestDropCodeKeepsContentAndCopies(t *testing.T) {
	page := os.Getpagesize()
	content := bytes.Repeat([]byte("vtpm"), 16*page/4)
	clean := mapFile(t, content, unix.PROT_READ)
	var sum byte
	for i := 0; i < len(clean); i += page {
		sum += clean[i]
	}
	// A private copy made read-only afterwards, as the loader leaves
	// relocated tables: dropping it would bring back the file's bytes.
	copied := mapFile(t, content, unix.PROT_READ|unix.PROT_WRITE)
	copy(copied, "changed")
	if err := unix.Mprotect(copied, unix.PROT_READ); err != nil {
		t.Fatal(err)
	}

	dropped, err := DropCode()
	if err != nil {
		t.Fatal(err)
	}
	if len(dropped) == 0 {
		t.Fatal("DropCode dropped nothing; the test binary's own code at least is mapped")
	}
	// mincore reports the page cache, not the mapping: the file's pages
	// stay cached, which is the point. Check the mapping through smaps.
	if rss := mappedBytes(t, clean); rss != 0 {
		t.Errorf("the clean read-only file mapping still has %d bytes mapped", rss)
	}
	if !bytes.Equal(clean, content) {
		t.Error("the clean mapping reads differently after DropCode")
	}
	if string(copied[:7]) != "changed" {
		t.Errorf("the modified read-only mapping lost its change: %q", copied[:7])
	}
	if resident(t, clean) == 0 {
		t.Error("the file's pages left the page cache")
	}
}

// mappedBytes returns the Rss that /proc/self/smaps reports for b's mapping.
func mappedBytes(t *testing.T, b []byte) int64 {
	t.Helper()
	data, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	start := uint64(uintptr(unsafe.Pointer(&b[0])))
	lines := strings.Split(string(data), "\n")
	for i, l := range lines {
		var s, e uint64
		if n, _ := fmt.Sscanf(l, "%x-%x", &s, &e); n == 2 && s == start {
			for _, m := range lines[i+1:] {
				if strings.HasPrefix(m, "Rss:") {
					return kB([]byte(m))
				}
			}
		}
	}
	t.Fatalf("mapping at %#x not in smaps", start)
	return 0
}
