package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"vtpm/internal/progress"
	"vtpm/internal/vm"
)

// tpmVMCmds are the `vtpm tpm` subcommands that act on VMs.
func tpmVMCmds() []*cobra.Command {
	return []*cobra.Command{tpmAddCmd(), tpmRemoveCmd(), onOtherHosts(tpmEnableCmd(true), "hosts"), onOtherHosts(tpmEnableCmd(false), "hosts")}
}

func tpmAddCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "add VM",
		Short: "Give a stopped VM a manufactured vTPM (turns Secure Boot on)",
		Long: `Manufacture a vTPM for VM (EKs and certificates from this host's CA, sealed
state under a new data key) and attach it. A TPM needs UEFI firmware, and a VM
booting from a passthrough disk cannot have one. Adding a TPM turns Secure Boot
on: OVMF's Secure Boot firmware with a variable store that has Microsoft's keys
enrolled.`,
		Args: cobra.ExactArgs(1),
		RunE: onVM(func(cmd *cobra.Command, h *vm.Registry, v *vm.VM) error {
			notes, err := h.AddTPM(v)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "added a manufactured vTPM to VM %s (%s)\n", v.Name(), v.TPMDir())
			printNotes(cmd.OutOrStdout(), notes)
			return nil
		}),
	}
}

func tpmRemoveCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "remove VM",
		Short: "Remove a stopped VM's vTPM, keeping its state in a backup",
		Args:  cobra.ExactArgs(1),
		RunE: onVM(func(cmd *cobra.Command, h *vm.Registry, v *vm.VM) error {
			res, err := h.RemoveTPM(v)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed the vTPM of VM %s; its state is kept in %s\n", v.Name(), res.Backup)
			fmt.Fprintln(cmd.ErrOrStderr(), res.Warning)
			return nil
		}),
	}
}

func tpmEnableCmd(on bool) *cobra.Command {
	verb := map[bool]string{true: "enable", false: "disable"}[on]
	var all, asJSON bool
	cmd := &cobra.Command{
		Use:   verb + " VM... | --all",
		Short: map[bool]string{true: "Reattach VMs' vTPMs (state and keys untouched)", false: "Detach VMs' vTPMs without touching their state or keys"}[on],
		Long: `With several VMs, or --all, every VM is tried even when some fail: one line per
VM with its result and reason, a summary, and a non-zero exit status if any
failed. A running VM sees the change at its next start.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if all == (len(args) > 0) {
				return errors.New("name the VMs, or give --all (not both)")
			}
			h := vmRegistry()
			refs, err := h.Targets(args, all)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			bar := progress.New(out, len(refs), !asJSON && progress.IsTerminal(out))
			results, _ := h.SetTPMsEnabled(refs, on, all, func(r vm.BulkResult) {
				if !asJSON {
					bar.Clear()
					fmt.Fprintln(out, r.Line(formatError))
				}
				bar.Step()
			})
			bar.Clear()
			sum := results.Summary()
			if asJSON {
				results.Explain(formatError) // the errors with their remedies
				if err := printJSON(out, results); err != nil {
					return err
				}
			} else {
				fmt.Fprintln(out, sum)
			}
			return sum.Err("tpm " + verb)
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "every registered VM")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON: an array of {vm, ok, skipped, error}")
	return cmd
}
