package main

import (
	"context"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/keyrelease"
)

// fleetGuardianCmd prints the fleet guardian's certificates as this host's key
// service answers them: `vtpm protector grant TPM --key-service URL` and
// `vtpm vm create … --key-service URL` run it, since vtpm links no network
// client.
func fleetGuardianCmd() *cobra.Command {
	var root, bundle, urls string
	cmd := &cobra.Command{
		Use:   "fleet-guardian",
		Short: "Print the key service's fleet guardian certificates (PEM), as this host's key service client",
		Long: `Ask the key service, with this host's client bundle (--key-service-client,
by default <data root>/` + keyrelease.BundleFile + `), for the fleet guardian's certificates and
print them (PEM). They are also kept in the data root, where vTPMs look for
the fleet guardian's row.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o := keyrelease.Options{Bundle: bundle}
			if urls != "" {
				o.Endpoints = strings.Split(urls, ",")
			}
			r, err := keyrelease.New(dataRoot(root), nil, o)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			certs, err := r.FleetCertificates(ctx)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(certs)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&root, "data-root", "", "the host's data root (default $VTPM_HOME or /var/lib/vtpm)")
	f.StringVar(&bundle, "key-service-client", "", "this host's key service client bundle (default DATA-ROOT/"+keyrelease.BundleFile+")")
	f.StringVar(&urls, "key-service", "", "the key service's node URLs, comma-separated (default the bundle's)")
	return cmd
}
