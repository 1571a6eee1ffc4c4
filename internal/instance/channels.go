package instance

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"

	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm"
)

// listen creates the listening sockets (and opens the chardev) before
// privileges are dropped. It makes only those not made yet, so New calls it
// once before the keys are opened, so that a client that waits for the
// control socket to appear (libvirt gives it a second) finds it while the
// keys open, and once more where a socket could not be made that early.
func (in *Instance) listen() error {
	var err error
	if in.opts.Chardev && in.chardev == nil {
		if err = in.openChardev(); err != nil {
			return err
		}
	}
	if c := in.opts.Ctrl; c != nil && c.ClientFD < 0 && in.ctrlLn == nil {
		if in.ctrlLn, err = in.listenEndpoint("--ctrl", c); err != nil {
			return err
		}
	}
	// --server type=tcp,fd=N is an already connected socket (swtpm_setup
	// passes a socketpair end); only the other forms listen.
	if s := in.opts.Server; s != nil && !(s.Type == "tcp" && s.FD >= 0) && in.dataLn == nil {
		if in.dataLn, err = in.listenEndpoint("--server", s); err != nil {
			return err
		}
	}
	return nil
}

func (in *Instance) listenEndpoint(opt string, e *swtpm.Endpoint) (net.Listener, error) {
	if e.FD >= 0 {
		ln, err := net.FileListener(os.NewFile(uintptr(e.FD), opt))
		if err != nil {
			return nil, fmt.Errorf("%s fd=%d is not a listening socket: %w", opt, e.FD, err)
		}
		return ln, nil
	}
	if e.Type == "tcp" {
		addr := net.JoinHostPort(e.BindAddr, strconv.Itoa(e.Port))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("%s: listen on %s: %w", opt, addr, err)
		}
		return ln, nil
	}
	os.Remove(e.Path) // swtpm unlinks a stale socket before bind
	ln, err := net.Listen("unix", e.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: listen on %s: %w", opt, e.Path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	in.unlink = append(in.unlink, e.Path)
	if err := os.Chmod(e.Path, e.Mode); err != nil {
		return nil, fmt.Errorf("%s: chmod %s: %w", opt, e.Path, err)
	}
	if e.UID >= 0 || e.GID >= 0 {
		if err := os.Chown(e.Path, e.UID, e.GID); err != nil {
			return nil, fmt.Errorf("%s: chown %s: %w", opt, e.Path, err)
		}
	}
	return ln, nil
}

func fdConn(fd int, what string) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), what)
	c, err := net.FileConn(f)
	f.Close() // FileConn dups the descriptor
	if err != nil {
		return nil, fmt.Errorf("%s fd=%d is not a connected socket: %w", what, fd, err)
	}
	return c, nil
}

func (in *Instance) startCtrl() error {
	c := in.opts.Ctrl
	if c.ClientFD >= 0 {
		conn, err := fdConn(c.ClientFD, "--ctrl clientfd")
		if err != nil {
			return err
		}
		go func() {
			in.serveCtrl(conn)
			// The one client that will ever exist has gone.
			in.finish(nil)
		}()
		return nil
	}
	go func() {
		for {
			conn, err := in.ctrlLn.Accept()
			if err != nil {
				select {
				case <-in.done:
				default:
					in.finish(fmt.Errorf("control channel: %w", err))
				}
				return
			}
			// One client at a time, as swtpm: the next waits in the backlog.
			in.serveCtrl(conn)
		}
	}()
	return nil
}

func (in *Instance) startData() error {
	switch {
	case in.chardev != nil:
		go in.serveChardev(in.chardev)
	case in.opts.DataFD >= 0:
		conn, err := fdConn(in.opts.DataFD, "--fd")
		if err != nil {
			return err
		}
		in.setData(conn)
		go in.serveData(conn, false, true)
	case in.opts.Server != nil && in.dataLn == nil: // tcp,fd=N: connected
		conn, err := fdConn(in.opts.Server.FD, "--server fd")
		if err != nil {
			return err
		}
		in.setData(conn)
		go in.serveData(conn, in.opts.Server.Disconnect, true)
	case in.dataLn != nil:
		go func() {
			for {
				conn, err := in.dataLn.Accept()
				if err != nil {
					select {
					case <-in.done:
					default:
						in.finish(fmt.Errorf("data channel: %w", err))
					}
					return
				}
				in.setData(conn)
				in.serveData(conn, in.opts.Server.Disconnect, in.opts.Terminate)
			}
		}()
	}
	return nil
}

func (in *Instance) setData(c net.Conn) {
	in.mu.Lock()
	in.dataConn = c
	in.mu.Unlock()
}

// serveData answers TPM commands on one data connection until it closes.
func (in *Instance) serveData(conn net.Conn, disconnect, terminate bool) {
	defer func() {
		conn.Close()
		in.mu.Lock()
		if in.dataConn == conn {
			in.dataConn = nil
		}
		in.mu.Unlock()
		if terminate {
			in.log.Info("data connection closed; terminating")
			in.finish(nil)
		}
	}()
	rw, closeRW := blockingIO(conn)
	defer closeRW()
	r := swtpm.NewDataReader(rw)
	for {
		req, err := r.Read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				in.log.Debug("data channel read", "err", err)
			}
			return
		}
		rsp := in.process(req)
		if req.Prefixed {
			rsp = swtpm.WrapResponse(rsp)
		}
		if _, err := rw.Write(rsp); err != nil {
			in.log.Debug("data channel write", "err", err)
			return
		}
		if disconnect {
			return
		}
	}
}

// serveCtrl answers control commands from one client until it disconnects.
func (in *Instance) serveCtrl(nc net.Conn) {
	c := swtpm.NewConn(nc)
	defer c.Close()
	for {
		req, err := c.ReadRequest()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				in.log.Debug("control channel read", "err", err)
			}
			return
		}
		rsp, after := in.handleCtrl(req)
		if err := c.Write(rsp); err != nil {
			in.log.Debug("control channel write", "err", err)
			return
		}
		if after != nil {
			after()
		}
		if req.Drop {
			return
		}
	}
}

// dropPrivileges switches to user (name or uid) after the sockets exist,
// first handing it stateDir and the files in it (a new TPM's identity,
// protector and lock file were just created as root), or swtpm's state
// file when it is a regular file (a block device keeps its owner: it stays
// open).
func dropPrivileges(name, stateDir, stateFile string) error {
	uid, gid, err := sandbox.LookupUser(name) // fails closed: never uid 0
	if err != nil {
		return err
	}
	// Started as that user already (as libvirt starts its vTPMs): there is
	// nothing to drop, and no right to change groups.
	if os.Getuid() == uid && os.Geteuid() == uid && os.Getgid() == gid && os.Getegid() == gid {
		return nil
	}
	if stateDir != "" {
		if err := chownTree(stateDir, uid, gid); err != nil {
			return fmt.Errorf("--runas %s: give it the state directory: %w", name, err)
		}
	}
	if fi, err := os.Lstat(stateFile); stateFile != "" && err == nil && fi.Mode().IsRegular() {
		if err := os.Lchown(stateFile, uid, gid); err != nil {
			return fmt.Errorf("--runas %s: give it the state file: %w", name, err)
		}
	}
	if err := syscall.Setgroups([]int{gid}); err != nil {
		return fmt.Errorf("--runas %s: setgroups: %w (run as root to change user)", name, err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("--runas %s: setgid: %w", name, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("--runas %s: setuid: %w", name, err)
	}
	// The state is opened by path from here on: say why it cannot be.
	if stateDir != "" {
		if _, err := os.Stat(stateDir); err != nil {
			return fmt.Errorf("--runas %s: the user cannot reach the state directory %s (%v); let it search every directory above it (chmod o+x), or keep the state where it can", name, stateDir, err)
		}
	}
	return nil
}

// fdIO reads and writes a socket with plain blocking system calls.
type fdIO int

func (f fdIO) Read(p []byte) (int, error) {
	for {
		n, err := syscall.Read(int(f), p)
		switch {
		case err == syscall.EINTR:
			continue
		case err != nil:
			return 0, err
		case n == 0 && len(p) > 0:
			return 0, io.EOF
		}
		return n, nil
	}
}

func (f fdIO) Write(p []byte) (int, error) {
	for {
		n, err := syscall.Write(int(f), p)
		if err == syscall.EINTR {
			continue
		}
		if err == nil && n < len(p) {
			return n, io.ErrShortWrite
		}
		return n, err
	}
}

// blockingIO returns blocking I/O on a copy of conn's socket, for use on a
// goroutine locked to its thread. The data channel is strictly request and
// response: a blocking read wakes straight into the next command, where the
// netpoller's try-park-wake cycle adds system calls and a thread hand-off to
// every round trip. It falls back to conn itself.
func blockingIO(conn net.Conn) (io.ReadWriter, func()) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return conn, func() {}
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return conn, func() {}
	}
	fd := -1
	raw.Control(func(s uintptr) {
		if d, err := syscall.Dup(int(s)); err == nil {
			fd = d
		}
	})
	if fd < 0 {
		return conn, func() {}
	}
	syscall.CloseOnExec(fd)
	if err := syscall.SetNonblock(fd, false); err != nil {
		syscall.Close(fd)
		return conn, func() {}
	}
	runtime.LockOSThread()
	return fdIO(fd), func() {
		syscall.Close(fd)
		runtime.UnlockOSThread()
	}
}

// chownTree gives dir and its top-level entries to uid:gid (state
// directories are flat; backups below them keep their owner).
func chownTree(dir string, uid, gid int) error {
	if err := os.Lchown(dir, uid, gid); err != nil {
		return err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Type().IsRegular() {
			if err := os.Lchown(filepath.Join(dir, e.Name()), uid, gid); err != nil {
				return err
			}
		}
	}
	return nil
}
