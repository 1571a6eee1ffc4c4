package main

import (
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"vtpm/internal/attest"
	"vtpm/internal/attest/tpmmode"
	"vtpm/internal/errdefs"
	"vtpm/internal/hostd"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keyrelease"
	"vtpm/internal/migrate/migrateapi"
	"vtpm/internal/paths"
	"vtpm/internal/transfersvc"
)

func serveCmd() *cobra.Command {
	var o hostd.Options
	var keyService, attestMode, attestTPM, eventLog string
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
/metrics over plain HTTP (keep it on a local or management address).

With a key service client bundle (--key-service-client, by default
<data root>/` + keyrelease.BundleFile + ` when it exists: the bundle the key service's
host add wrote for this host), the service attests this host at start and
before its health certificate expires, and a TPM that no guardian of this
host opens but whose protector has the fleet guardian's row gets its key
from the key service (--key-service URL,… replaces the bundle's nodes).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.APISocket = apiSocket
			o.Version = version
			o.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
			switch attestMode {
			case "key":
			case "tpm":
				if attestTPM == "" {
					attestTPM = os.Getenv("VTPM_HOST_TPM")
				}
				o.KeyService.Prover = tpmmode.Prover{Options: attest.HostOptions{TPM: attestTPM, EventLog: eventLog}}
			default:
				return errdefs.New(errdefs.ErrInvalidArgument, "--attest %q: key or tpm, as the host was registered with the key service", attestMode)
			}
			if keyService != "" {
				o.KeyService.Endpoints = strings.Split(keyService, ",")
				if !o.KeyService.Configured(dataRoot(o.DataRoot)) {
					return errdefs.New(errdefs.ErrInvalidArgument, "--key-service needs this host's client bundle of the key service: --key-service-client BUNDLE, or %s in the data root", keyrelease.BundleFile)
				}
			}
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
	f.StringVar(&o.KeyService.Bundle, "key-service-client", "", "this host's key service client bundle (default DATA-ROOT/"+keyrelease.BundleFile+" when it exists)")
	f.StringVar(&keyService, "key-service", "", "the key service's node URLs, comma-separated (default the bundle's)")
	f.StringVar(&attestMode, "attest", "key", "how this host attests to the key service, as it was registered: key (its guardian's key) or tpm (its TPM's quote of its boot)")
	f.StringVar(&attestTPM, "attest-tpm", "", "--attest tpm: the host TPM (device:PATH, tcp:HOST:PORT, unix:PATH; default $VTPM_HOST_TPM, else "+attest.DefaultTPM+")")
	f.StringVar(&eventLog, "event-log", "", "--attest tpm: the measured-boot event log (default "+attest.DefaultEventLog+")")
	return cmd
}

// dataRoot is the --data-root flag, else the host's default.
func dataRoot(flag string) string {
	if flag != "" {
		return flag
	}
	return paths.HostDataRoot()
}
