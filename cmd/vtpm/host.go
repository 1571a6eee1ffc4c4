package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func hostCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "host",
		Short: "This host: the host files and devices VMs may use, its host service, the hosts it trusts",
		Long: `A VM bundle travels between hosts, so its vm.json cannot grant itself host
files: a disk, kernel or initrd outside the bundle, and every passthrough
device, must be allowed by this host (` + "`<data root>/host.json`" + `). vm create
allows the paths it is given; a bundle registered from elsewhere that names
other paths is refused until they are allowed here.

serve, trust, untrust, list and info are the host service's, run by
` + hostHelper + ` (found beside vtpm, else in PATH).`,
	}
	cmd.AddCommand(hostAllowCmd(true), hostAllowCmd(false), hostPathsCmd())
	cmd.AddCommand(
		forwardCmd(hostHelper, "serve", "Run the host service: keys for vTPMs that cannot open the keystore, and the API"),
		forwardCmd(hostHelper, "trust NAME ADDRESS CERTS.pem", "Trust another host: it may call this host's API, and its guardian owns TPMs that open here"),
		forwardCmd(hostHelper, "untrust NAME", "Stop trusting a host"),
		forwardCmd(hostHelper, "list", "List the hosts this host trusts, with their state"),
		forwardCmd(hostHelper, "info [NAME]", "Describe this host, or a trusted host"))
	return cmd
}

func hostAllowCmd(allow bool) *cobra.Command {
	verb := map[bool]string{true: "allow-path", false: "disallow-path"}[allow]
	return &cobra.Command{
		Use: verb + " PATH...",
		Short: map[bool]string{
			true:  "Allow VMs to use a host file, directory (and what is below it) or device outside their bundles",
			false: "Take a path off the list VMs may use",
		}[allow],
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			h := vmRegistry()
			change := h.DisallowPaths
			if allow {
				change = h.AllowPaths
			}
			changed, err := change(args...)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if len(changed) == 0 {
				fmt.Fprintln(w, "nothing changed")
			}
			for _, p := range changed {
				fmt.Fprintf(w, "%s: %s\n", map[bool]string{true: "allowed", false: "no longer allowed"}[allow], p)
			}
			return nil
		},
	}
}

func hostPathsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "paths",
		Short: "List the host paths VMs may use",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := vmRegistry().HostConfig()
			if err != nil {
				return err
			}
			return emit(cmd, asJSON, append([]string{}, c.AllowedPaths...), func(w io.Writer) {
				for _, p := range c.AllowedPaths {
					fmt.Fprintln(w, p)
				}
			})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
