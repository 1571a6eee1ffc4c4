package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"vtpm/internal/keybroker"
)

func tpmCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "tpm", Short: "Manage vTPMs"}
	var onMissing string
	policy := &cobra.Command{
		Use:   "policy VM|TPM-DIR [--on-missing-key fail|reprovision]",
		Short: "Show or set what happens when no guardian can open a TPM's key",
		Long: `on-missing-key=fail (the default) refuses to start a TPM whose key cannot be
opened and explains the ways out. on-missing-key=reprovision moves the old state
into a timestamped backup beside it and provisions a fresh TPM: secrets sealed
to the old TPM (BitLocker, LUKS) will need their recovery keys.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var set *string // only when given
			if cmd.Flags().Changed("on-missing-key") {
				set = &onMissing
			}
			p, err := keybroker.UpdatePolicy(tpmDir(args[0]), set)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "on-missing-key: %s\n", p.OnMissingKey)
			return nil
		},
	}
	policy.Flags().StringVar(&onMissing, "on-missing-key", "fail", "fail or reprovision")
	cmd.AddCommand(policy)
	cmd.AddCommand(tpmManufactureCmds()...)
	cmd.AddCommand(tpmVMCmds()...)
	return cmd
}
