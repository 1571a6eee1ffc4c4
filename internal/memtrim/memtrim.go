// Package memtrim lets a long-lived, mostly idle process give back the
// pages of its code while it waits.
//
// A process maps the pages of its executable and libraries as it runs
// them, 64 KiB around each first touch, and keeps them mapped for good: a
// vTPM that ran its start-up once holds most of a 12 MB Go binary for the
// rest of the VM's life. Those pages are clean copies of files in the page
// cache, so unmapping them loses nothing: the next command faults back,
// from the page cache, only what it runs. Unmapped, they count against no
// process and the kernel can reclaim them under memory pressure.
package memtrim

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Mapping is one mapping DropCode unmapped.
type Mapping struct {
	Start, End uint64
	Path       string
	Rss        int64 // bytes that were mapped
}

// DropCode unmaps the resident pages of every mapping of a file that this
// process cannot write and has not modified: code and read-only data. A
// mapping holding a page the process changed (a private copy, such as a
// relocation table made read-only after the loader wrote it) is left alone,
// since dropping it would bring back the file's unmodified bytes. Mappings
// that another thread maps or changes protection of meanwhile are not
// expected in the processes that use this (their loader has finished).
func DropCode() ([]Mapping, error) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return nil, fmt.Errorf("memtrim: %w", err)
	}
	defer f.Close()
	ms, err := candidates(f)
	if err != nil {
		return nil, err
	}
	var dropped []Mapping
	for _, m := range ms {
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(m.Start), uintptr(m.End-m.Start), unix.MADV_DONTNEED); errno != 0 {
			return dropped, fmt.Errorf("memtrim: madvise %s at %#x: %w", m.Path, m.Start, errno)
		}
		dropped = append(dropped, m)
	}
	return dropped, nil
}

// candidates parses smaps (proc(5)) and returns the mappings DropCode may
// drop: backed by a file, not writable, no anonymous (copied) pages, and
// some pages resident.
func candidates(r io.Reader) ([]Mapping, error) {
	var (
		out     []Mapping
		cur     Mapping
		ok      bool  // cur is a file mapping without write permission
		anon    int64 // the mapping's copied bytes; -1 until read
		haveCur bool
	)
	flush := func() {
		if haveCur && ok && anon == 0 && cur.Rss > 0 {
			out = append(out, cur)
		}
	}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Bytes()
		if f := bytes.Fields(line); len(f) >= 5 && bytes.IndexByte(f[0], '-') > 0 && !bytes.HasSuffix(f[0], []byte(":")) {
			// A mapping's header: start-end perms offset dev inode [path]
			flush()
			se := bytes.SplitN(f[0], []byte("-"), 2)
			start, err1 := strconv.ParseUint(string(se[0]), 16, 64)
			end, err2 := strconv.ParseUint(string(se[1]), 16, 64)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("memtrim: smaps line %q", line)
			}
			// Anonymous is unknown until its line is read.
			cur, anon, haveCur = Mapping{Start: start, End: end}, -1, true
			if len(f) >= 6 {
				cur.Path = string(f[5])
			}
			perms := f[1]
			ok = len(perms) == 4 && perms[1] != 'w' && len(cur.Path) > 0 && cur.Path[0] == '/'
			continue
		}
		switch {
		case bytes.HasPrefix(line, []byte("Rss:")):
			cur.Rss = kB(line)
		case bytes.HasPrefix(line, []byte("Anonymous:")):
			anon = kB(line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("memtrim: reading smaps: %w", err)
	}
	flush()
	return out, nil
}

// kB reads "Name:   123 kB" as bytes; -1 when it does not parse, which
// keeps a mapping with an unreadable Anonymous line.
func kB(line []byte) int64 {
	f := bytes.Fields(line)
	if len(f) != 3 {
		return -1
	}
	n, err := strconv.ParseInt(string(f[1]), 10, 64)
	if err != nil {
		return -1
	}
	return n << 10
}
