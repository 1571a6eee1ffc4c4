package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"vtpm/internal/progress"
	"vtpm/internal/vm"
)

// tpmVMCmds are the `vtpm tpm` subcommands that act on VMs.
func tpmVMCmds() []*cobra.Command {
	return []*cobra.Command{tpmAddCmd(), tpmRemoveCmd(), tpmEnableCmd(true), tpmEnableCmd(false)}
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
			backup, err := h.RemoveTPM(v)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed the vTPM of VM %s; its state is kept in %s\n", v.Name(), backup)
			fmt.Fprintf(cmd.ErrOrStderr(), "WARNING: secrets the guest sealed to this TPM no longer open: BitLocker will ask for its recovery key at the next boot "+
				"(have it ready), and LUKS volumes bound to the TPM need their passphrase. To get the TPM back, stop the VM and move %s back to %s.\n",
				backup, v.TPMDir())
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
			results, failed := h.SetTPMsEnabled(refs, on, all, func(r vm.BulkResult) {
				if !asJSON {
					bar.Clear()
					printBulk(out, r)
				}
				bar.Step()
			})
			bar.Clear()
			if asJSON {
				for i, r := range results {
					if r.Err != nil {
						results[i].Error = formatError(r.Err) // with its remedies
					}
				}
				if err := printJSON(out, results); err != nil {
					return err
				}
			} else {
				skipped := 0
				for _, r := range results {
					if r.Skipped {
						skipped++
					}
				}
				if skipped > 0 {
					fmt.Fprintf(out, "%d ok, %d skipped, %d failed\n", len(results)-failed-skipped, skipped, failed)
				} else {
					fmt.Fprintf(out, "%d ok, %d failed\n", len(results)-failed, failed)
				}
			}
			if failed > 0 {
				return fmt.Errorf("tpm %s: %d of %d VMs failed", verb, failed, len(results))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "every registered VM")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON: an array of {vm, ok, skipped, error}")
	return cmd
}

func printBulk(w io.Writer, r vm.BulkResult) {
	switch {
	case r.Skipped:
		fmt.Fprintf(w, "%s: skipped (%s)\n", r.VM, r.Note)
	case !r.OK:
		// One line per VM: longer explanations are joined.
		fmt.Fprintf(w, "%s: failed: %s\n", r.VM, strings.Join(strings.Fields(formatError(r.Err)), " "))
	case r.Note != "":
		fmt.Fprintf(w, "%s: ok (%s)\n", r.VM, r.Note)
	default:
		fmt.Fprintf(w, "%s: ok\n", r.VM)
	}
}
