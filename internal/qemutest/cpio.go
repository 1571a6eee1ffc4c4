package qemutest

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"
)

// cpioEntry is one member of a newc archive. Building the archive in Go
// (instead of with cpio(1)) lets us add /dev/console without being root and
// keeps the output byte-for-byte reproducible.
type cpioEntry struct {
	name    string // relative, no leading slash
	mode    uint32 // type bits | permissions
	data    []byte // file contents or symlink target
	rdevMaj uint32
	rdevMin uint32
}

const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioCharDev = 0o020000
)

// cpioTree collects entries by name; later additions replace earlier ones and
// parent directories are created implicitly.
type cpioTree struct {
	entries map[string]cpioEntry
}

func newCpioTree() *cpioTree {
	return &cpioTree{entries: make(map[string]cpioEntry)}
}

func (c *cpioTree) mkdirAll(dir string) {
	dir = strings.Trim(path.Clean(dir), "/")
	if dir == "" || dir == "." {
		return
	}
	if _, ok := c.entries[dir]; ok {
		return
	}
	c.mkdirAll(path.Dir(dir))
	c.entries[dir] = cpioEntry{name: dir, mode: cpioDir | 0o755}
}

func (c *cpioTree) add(e cpioEntry) {
	e.name = strings.Trim(path.Clean(e.name), "/")
	c.mkdirAll(path.Dir(e.name))
	c.entries[e.name] = e
}

func (c *cpioTree) file(name string, perm fs.FileMode, data []byte) {
	c.add(cpioEntry{name: name, mode: cpioFile | uint32(perm.Perm()), data: data})
}

func (c *cpioTree) symlink(name, target string) {
	c.add(cpioEntry{name: name, mode: cpioSymlink | 0o777, data: []byte(target)})
}

// writeTo writes the archive in name order; sorting puts every directory
// before its contents.
func (c *cpioTree) writeTo(w io.Writer) error {
	names := make([]string, 0, len(c.entries))
	for n := range c.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	ino := uint32(1)
	for _, n := range names {
		if err := writeCpioEntry(w, ino, c.entries[n]); err != nil {
			return err
		}
		ino++
	}
	return writeCpioEntry(w, 0, cpioEntry{name: "TRAILER!!!"})
}

func writeCpioEntry(w io.Writer, ino uint32, e cpioEntry) error {
	nlink := uint32(1)
	if e.mode&0o170000 == cpioDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdevMaj, e.rdevMin, len(e.name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(e.name)+4+len(e.data)+4)
	buf = append(buf, hdr...)
	buf = append(buf, e.name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	buf = append(buf, e.data...)
	buf = pad4(buf)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("write cpio entry %s: %w", e.name, err)
	}
	return nil
}

// pad4 pads relative to the start of the entry; entries always start on a
// 4-byte boundary, so that is the same as the archive offset.
func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}
