package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
)

func trustCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "trust CERTS.pem",
		Short: "Trust a guardian, by its public certificates, as the owner of TPMs that open on this host",
		Long: "A TPM's key protector opens here only when its owner is a guardian this host holds or trusts: " +
			"a protector signed by anyone else may have been put into the bundle by whoever could write it. " +
			"CERTS.pem is what `vtpm guardian export --certs-only` writes on the owner's host; " +
			"check the fingerprint printed here against the one `vtpm guardian show` prints there.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			g, err := guardian.ReadCertificates(args[0])
			if err != nil {
				return err
			}
			return withHost(func(h *keybroker.Broker) error {
				added, err := h.Trust(g)
				if err != nil {
					return err
				}
				if !added {
					fmt.Fprintf(cmd.OutOrStdout(), "guardian %s (%s) is trusted already\n", g.Name(), g.Fingerprint())
					return nil
				}
				fmt.Fprintf(cmd.OutOrStdout(), "trusting guardian %s (%s) as the owner of TPMs that open here\n", g.Name(), g.Fingerprint())
				return nil
			})
		},
	}
}

func untrustCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "untrust NAME|FINGERPRINT",
		Short: "Stop trusting a guardian as the owner of TPMs: the TPMs it owns no longer open here",
		Args:  cobra.ExactArgs(1),
		RunE: onHost(func(cmd *cobra.Command, h *keybroker.Broker, args []string) error {
			g, err := h.Untrust(args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "no longer trusting guardian %s (%s)\n", g.Name(), g.Fingerprint())
			return nil
		}),
	}
}
