package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"

	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/paths"
)

func hostServeCmd() *cobra.Command {
	var socket, dataRoot string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the host service: open keys for vTPMs that cannot open the keystore (libvirt's tss)",
		Long: `Run the host service in the foreground, as root. It holds this host's
keystore and answers vTPM processes on a local socket: an instance or
swtpm_setup that runs as another user (libvirt runs them as tss) asks it for
the key of the TPM whose state directory it holds, and for that TPM's
generation record. It answers root and the users named in
<data root>/` + hostsvc.ConfigFile + ` ({"users": ["tss"]}; tss when absent), and only for
the state directory whose lock the caller holds.

Under systemd, vtpm-host.socket starts it on the first connection (socket
activation, LISTEN_FDS); otherwise it listens on --socket, by default
$` + hostsvc.SocketEnv + ` or ` + hostsvc.DefaultSocket + `.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if socket == "" {
				socket = hostsvc.SocketPath()
			}
			if dataRoot == "" {
				dataRoot = paths.HostDataRoot()
			}
			return serveHost(cmd.Context(), socket, dataRoot)
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "listen on this socket (default $"+hostsvc.SocketEnv+" or "+hostsvc.DefaultSocket+")")
	cmd.Flags().StringVar(&dataRoot, "data-root", "", "the host's data root (default $VTPM_HOME or /var/lib/vtpm)")
	return cmd
}

func serveHost(ctx context.Context, socket, dataRoot string) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg, err := hostsvc.ReadConfig(dataRoot)
	if err != nil {
		return err
	}
	b, err := keybroker.Open(dataRoot, keystore.Options{HostTPM: os.Getenv("VTPM_HOST_TPM"), Logger: log})
	if err != nil {
		return err
	}
	defer b.Close()
	// The host's guardian exists before the first vTPM asks.
	if _, err := b.Local(); err != nil {
		return err
	}
	l, cleanup, err := hostListener(socket)
	if err != nil {
		return err
	}
	defer cleanup()
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("host service ready", "socket", l.Addr().String(), "data_root", dataRoot, "users", cfg.Users)
	return hostsvc.NewServer(b, cfg, log).Serve(ctx, l)
}

// hostListener is the socket systemd passed (LISTEN_FDS), else a new one at
// path: world-connectable, since callers are admitted by their credentials.
func hostListener(path string) (*net.UnixListener, func(), error) {
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
