package hostd

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"vtpm/internal/hostsvc"
)

// The local API's socket.
const (
	// DefaultAPISocket is where the host service serves this host's CLI.
	DefaultAPISocket = "/run/vtpm/api.sock"
	// APISocketEnv names the environment variable that overrides it.
	APISocketEnv = "VTPM_API_SOCKET"
)

// APISocketPath is $VTPM_API_SOCKET; else api.sock beside the key socket
// when $VTPM_HOST_SOCKET moves that; else DefaultAPISocket.
func APISocketPath() string {
	if s := os.Getenv(APISocketEnv); s != "" {
		return s
	}
	if s := os.Getenv(hostsvc.SocketEnv); s != "" {
		return APISocketBeside(s)
	}
	return DefaultAPISocket
}

// APISocketBeside is the API socket of a service whose key socket is
// keySocket: in the same directory, so that services with their own
// directories (tests, several data roots) do not meet.
func APISocketBeside(keySocket string) string {
	return filepath.Join(filepath.Dir(keySocket), filepath.Base(DefaultAPISocket))
}

// listenAPI listens on the local API's socket, mode 0600, and accepts only
// processes of root or of this process's user.
func listenAPI(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	// A socket left by a service that did not stop cleanly; a live one
	// answers, and is not taken over.
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("a host service already serves its API on %s", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	// Created 0600 from the start: no window in which others could connect.
	old := unix.Umask(0o177)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(true)
	return &credListener{UnixListener: l, uid: uint32(os.Geteuid())}, nil
}

// credListener drops connections from processes of other users than root
// and uid (SO_PEERCRED): the mode of the socket says the same, but a
// socket's mode is not checked everywhere (a descriptor passed on).
type credListener struct {
	*net.UnixListener
	uid uint32
}

func (l *credListener) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, err
		}
		uid, err := peerUID(c)
		if err == nil && (uid == 0 || uid == l.uid) {
			return c, nil
		}
		c.Close()
	}
}

func peerUID(c *net.UnixConn) (uint32, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, cerr
	}
	return cred.Uid, nil
}
