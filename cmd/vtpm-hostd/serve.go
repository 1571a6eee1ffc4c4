package main

import (
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"vtpm/internal/hostd"
	"vtpm/internal/hostsvc"
	"vtpm/internal/migrate/migrateapi"
	"vtpm/internal/transfersvc"
)

func serveCmd() *cobra.Command {
	var o hostd.Options
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the host service: keys for vTPMs that cannot open the keystore, and the API",
		Long: `Run the host service in the foreground, as root. It holds this host's
keystore and answers vTPM processes on a local socket: an instance or
swtpm_setup that runs as another user (libvirt runs them as tss) asks it for
the key of the TPM whose state directory it holds, and for that TPM's
generation record. It answers root and the users named in
<data root>/` + hostsvc.ConfigFile + ` ({"users": ["tss"]}; tss when absent), and only for
the state directory whose lock the caller holds.

Under systemd, vtpm-host.socket starts it on the first connection (socket
activation, LISTEN_FDS); otherwise it listens on --socket, by default
$` + hostsvc.SocketEnv + ` or ` + hostsvc.DefaultSocket + `.

This host's CLI reaches its API on --api-socket (root only, default
$` + hostd.APISocketEnv + ` or ` + hostd.DefaultAPISocket + `). With --listen ADDRESS:PORT the
API is also served over TLS 1.3 to the hosts this host trusts (vtpm host
trust), each side authenticated by a certificate issued under its
guardian. With --metrics ADDRESS:PORT, Prometheus metrics are served at
/metrics over plain HTTP (keep it on a local or management address).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.APISocket = apiSocket
			o.Version = version
			o.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
			s, err := hostd.New(o)
			if err != nil {
				return err
			}
			s.Register(migrateapi.Services(s)...)
			s.Register(transfersvc.Services(s)...)
			return s.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.Socket, "socket", "", "listen for vTPMs on this socket (default $"+hostsvc.SocketEnv+" or "+hostsvc.DefaultSocket+")")
	f.StringVar(&o.DataRoot, "data-root", "", "the host's data root (default $VTPM_HOME or /var/lib/vtpm)")
	f.StringVar(&o.Listen, "listen", "", "serve the API to trusted hosts on this TCP address (ADDRESS:PORT), over mutual TLS")
	f.StringVar(&o.Metrics, "metrics", "", "serve Prometheus metrics at /metrics on this TCP address (ADDRESS:PORT), plain HTTP")
	f.StringVar(&o.Name, "name", "", "this host's name in its certificate (default the system's host name)")
	return cmd
}
