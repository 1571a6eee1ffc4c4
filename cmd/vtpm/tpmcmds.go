package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
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
		RunE: func(cmd *cobra.Command, args []string) error {
			h := vmRegistry()
			v, err := h.Open(args[0])
			if err != nil {
				return err
			}
			notes, err := h.AddTPM(v)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "added a manufactured vTPM to VM %s (%s)\n", v.Name(), v.TPMDir())
			printNotes(cmd.OutOrStdout(), notes)
			return nil
		},
	}
}

func tpmRemoveCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "remove VM",
		Short: "Remove a stopped VM's vTPM, keeping its state in a backup",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			h := vmRegistry()
			v, err := h.Open(args[0])
			if err != nil {
				return err
			}
			backup, err := h.RemoveTPM(v)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed the vTPM of VM %s; its state is kept in %s\n", v.Name(), backup)
			fmt.Fprintf(cmd.ErrOrStderr(), "WARNING: secrets the guest sealed to this TPM no longer open: BitLocker will ask for its recovery key at the next boot "+
				"(have it ready), and LUKS volumes bound to the TPM need their passphrase. To get the TPM back, stop the VM and move %s back to %s.\n",
				backup, v.TPMDir())
			return nil
		},
	}
}

// bulkResult is one VM's outcome in a bulk operation.
type bulkResult struct {
	VM    string `json:"vm"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	Note  string `json:"note,omitempty"`
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
			refs := args
			if all {
				entries, err := h.Entries()
				if err != nil {
					return err
				}
				refs = nil
				for _, e := range entries {
					if v, err := h.Open(e.UUID.String()); err == nil && v.Config.Template {
						continue // templates never have a TPM to switch
					}
					refs = append(refs, e.Name)
				}
			}
			out := cmd.OutOrStdout()
			bar := newProgress(out, len(refs), !asJSON && isTerminal(out))
			results := make([]bulkResult, 0, len(refs))
			failed := 0
			for _, ref := range refs {
				r := bulkResult{VM: ref}
				v, err := h.Open(ref)
				if err == nil {
					r.Note, err = h.SetTPMEnabled(v, on)
				}
				if err != nil {
					r.Error = formatError(err) // with its remedies
					failed++
				} else {
					r.OK = true
				}
				results = append(results, r)
				if !asJSON {
					bar.clear()
					printBulk(out, r)
				}
				bar.step()
			}
			bar.clear()
			if asJSON {
				if err := printJSON(out, results); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(out, "%d ok, %d failed\n", len(results)-failed, failed)
			}
			if failed > 0 {
				return fmt.Errorf("tpm %s: %d of %d VMs failed", verb, failed, len(results))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "every registered VM")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON: an array of {vm, ok, error}")
	return cmd
}

func printBulk(w io.Writer, r bulkResult) {
	switch {
	case !r.OK:
		// One line per VM: longer explanations are joined.
		fmt.Fprintf(w, "%s: failed: %s\n", r.VM, strings.Join(strings.Fields(r.Error), " "))
	case r.Note != "":
		fmt.Fprintf(w, "%s: ok (%s)\n", r.VM, r.Note)
	default:
		fmt.Fprintf(w, "%s: ok\n", r.VM)
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// progress is a one-line progress bar redrawn in place on a terminal.
type progress struct {
	w         io.Writer
	done, n   int
	on, drawn bool
}

func newProgress(w io.Writer, n int, on bool) *progress {
	p := &progress{w: w, n: n, on: on && n > 0}
	p.draw()
	return p
}

func (p *progress) draw() {
	if !p.on {
		return
	}
	const width = 30
	fill := width * p.done / p.n
	fmt.Fprintf(p.w, "\r[%s%s] %d/%d", strings.Repeat("#", fill), strings.Repeat(" ", width-fill), p.done, p.n)
	p.drawn = true
}

func (p *progress) step() {
	p.done++
	p.draw()
}

func (p *progress) clear() {
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
}
