// Command vtpm-hostd is vtpm's host service and the commands that talk to
// it: `vtpm-hostd serve` runs the service (the key socket for vTPMs that
// cannot open the keystore, the API for this host's CLI and its trusted
// peers, metrics); `vtpm host trust|untrust|list|info` are forwarded here
// by vtpm, which stays free of the API's dependencies (every vTPM is a vtpm
// process and would pay their initialisation at each start).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"vtpm/internal/clirender"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	err := rootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "vtpm:", clirender.Error(err))
		os.Exit(1)
	}
}

// apiSocket is the local API's socket the client commands use ("":
// $VTPM_API_SOCKET, else the default).
var apiSocket string

func rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "vtpm-hostd",
		Short:         "vtpm's host service, and the commands that talk to it",
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&apiSocket, "api-socket", "", "the host service's API socket (default $VTPM_API_SOCKET, else api.sock beside the key socket: /run/vtpm/api.sock)")
	// `vtpm host …` arrives as `vtpm-hostd host …`, its arguments unchanged.
	host := &cobra.Command{Use: "host", Short: "This host's service and the hosts it trusts"}
	host.AddCommand(serveCmd(), trustCmd(), untrustCmd(), listCmd(), infoCmd())
	root.AddCommand(serveCmd(), host, fleetGuardianCmd())
	root.AddCommand(vmCmd(), tpmCmd())
	return root
}
