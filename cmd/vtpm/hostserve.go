package main

import (
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"vtpm/internal/hostsvc"
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
			return hostsvc.Run(cmd.Context(), socket, dataRoot, slog.New(slog.NewTextHandler(os.Stderr, nil)))
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "listen on this socket (default $"+hostsvc.SocketEnv+" or "+hostsvc.DefaultSocket+")")
	cmd.Flags().StringVar(&dataRoot, "data-root", "", "the host's data root (default $VTPM_HOME or /var/lib/vtpm)")
	return cmd
}
