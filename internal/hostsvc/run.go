package hostsvc

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/manufacture"
	"vtpm/internal/paths"
)

// Listen returns the socket systemd passed (LISTEN_FDS), else a new one at
// path: world-connectable, since callers are admitted by their credentials.
func Listen(path string) (*net.UnixListener, func(), error) {
	if pid, _ := strconv.Atoi(os.Getenv("LISTEN_PID")); pid == os.Getpid() {
		if n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS")); n >= 1 {
			os.Unsetenv("LISTEN_PID")
			os.Unsetenv("LISTEN_FDS")
			os.Unsetenv("LISTEN_FDNAMES")
			syscall.CloseOnExec(3)
			l, err := net.FileListener(os.NewFile(3, "LISTEN_FDS"))
			if err != nil {
				return nil, nil, fmt.Errorf("socket passed by systemd: %w", err)
			}
			ul, ok := l.(*net.UnixListener)
			if !ok {
				l.Close()
				return nil, nil, fmt.Errorf("socket passed by systemd is not a unix socket")
			}
			return ul, func() {}, nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, nil, err
	}
	// A socket left by a service that did not stop cleanly; a live one
	// answers, and is not taken over.
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, nil, fmt.Errorf("a host service already listens on %s", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, err
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, nil, err
	}
	l.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o666); err != nil {
		l.Close()
		return nil, nil, err
	}
	return l, func() { l.Close() }, nil
}

// SetupHost is the host swtpm_setup manufactures with, for the state in
// stateDir (a path or dir:// URI): the keystore of the host's data root
// (never one under an inherited $HOME: libvirt runs swtpm_setup as tss with
// HOME=/root), or, when this process cannot open it, the host service.
func SetupHost(stateDir string, log *slog.Logger) manufacture.OpenHost {
	return func() (manufacture.Host, error) {
		h, err := keybroker.Open(paths.HostDataRoot(), keystore.Options{HostTPM: os.Getenv("VTPM_HOST_TPM"), Logger: log})
		if err == nil {
			return manufacture.FromBroker(func() (*keybroker.Broker, error) { return h, nil })()
		}
		if !UseService(err) {
			return nil, err
		}
		return &Keys{Dir: strings.TrimPrefix(stateDir, "dir://"), KeystoreErr: err}, nil
	}
}
