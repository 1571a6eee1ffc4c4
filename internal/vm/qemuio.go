package vm

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// optEscape writes s for a QEMU option string ("key=value,key=value"),
// where a comma in a value is written twice; anything else in it is
// taken literally. Values that are whole arguments (-kernel, -append,
// -pidfile) are not option strings and must not be escaped.
func optEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// qemuIO is how QEMU reaches a VM's files and sockets: by their paths, or
// through descriptors this process opened and hands to QEMU, so that a
// QEMU running as an unprivileged user needs no access to the bundle, the
// run directory or host devices, and can reach nothing else by name.
type qemuIO interface {
	// file is what QEMU opens for the existing file or device at path.
	file(path string, write bool) (string, error)
	// log is what QEMU opens to write the log at path, created anew.
	log(path string) (string, error)
	// socket is the address part of a socket chardev for the unix socket
	// at path: one this process listens on (listen), or connects to.
	socket(path string, listen bool) (string, error)
}

// pathIO lets QEMU open everything by its path.
type pathIO struct{}

func (pathIO) file(path string, _ bool) (string, error) { return optEscape(path), nil }

func (pathIO) log(path string) (string, error) { return optEscape(path), nil }

func (pathIO) socket(path string, _ bool) (string, error) { return "path=" + optEscape(path), nil }

// fdIO opens files and sockets in this process and hands them to QEMU as
// inherited descriptors: files through fd sets (-add-fd, /dev/fdset/N),
// sockets by number.
type fdIO struct {
	files []*os.File // become descriptors 3, 4, ... in QEMU
	args  []string   // -add-fd options
	sets  int
}

// fd is the descriptor number f gets in QEMU.
func (x *fdIO) add(f *os.File) int {
	x.files = append(x.files, f)
	return 2 + len(x.files)
}

func (x *fdIO) file(path string, write bool) (string, error) {
	// A writable image is opened read-write at once (qemuArgs gives its
	// drive file.auto-read-only=off), so its set holds that descriptor
	// alone: a read-only one beside it would be another open file
	// description, whose image locks conflict with the read-write one's
	// when QEMU takes its images back after a completed migration (cont).
	mode := os.O_RDONLY
	if write {
		mode = os.O_RDWR
	}
	return x.set(path, []int{mode})
}

func (x *fdIO) log(path string) (string, error) {
	return x.set(path, []int{os.O_WRONLY | os.O_CREATE | os.O_TRUNC})
}

// set opens path once in each of modes into a new fd set.
func (x *fdIO) set(path string, modes []int) (string, error) {
	x.sets++
	for _, m := range modes {
		f, err := os.OpenFile(path, m|syscall.O_CLOEXEC, 0o600)
		if err != nil {
			return "", err
		}
		x.args = append(x.args, "-add-fd", fmt.Sprintf("fd=%d,set=%d", x.add(f), x.sets))
	}
	return "/dev/fdset/" + strconv.Itoa(x.sets), nil
}

func (x *fdIO) socket(path string, listen bool) (string, error) {
	var f *os.File
	if listen {
		os.Remove(path)
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			return "", err
		}
		ln.SetUnlinkOnClose(false)
		f, err = ln.File()
		ln.Close()
		if err != nil {
			return "", err
		}
	} else {
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			return "", err
		}
		f, err = c.File()
		c.Close()
		if err != nil {
			return "", err
		}
	}
	return "fd=" + strconv.Itoa(x.add(f)), nil
}

// close closes this process's copies of the descriptors.
func (x *fdIO) close() {
	for _, f := range x.files {
		f.Close()
	}
	x.files = nil
}
