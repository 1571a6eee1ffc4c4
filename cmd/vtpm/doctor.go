package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"vtpm/internal/errdefs"
	"vtpm/internal/hostcheck"
	"vtpm/internal/paths"
)

// Check statuses, as doctor prints them.
const (
	statusOK      = string(hostcheck.OK)
	statusWarning = string(hostcheck.Warning)
	statusMissing = string(hostcheck.Missing)
)

// check is one line of `vtpm doctor`: a hostcheck.Check with its remedies
// rendered.
type check struct {
	Name   string `json:"name"`
	Status string `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

func doctorCmd() *cobra.Command {
	var (
		asJSON bool
		probe  bool
		po     hostcheck.ProbeOptions
	)
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Check what this host provides to run and isolate vTPMs",
		Long: `Check this host: the sandbox of the vTPM processes (seccomp, Landlock,
no_new_privs, namespaces, locked memory), KVM, QEMU and its TPM emulator
support, the user and seccomp sandbox QEMU runs under, the OVMF firmware files, how the keystore's master key is protected,
the data root's permissions, and the host service (its socket, whether it
answers, and the users it answers). Each check is ok, warning or missing, with
the fix. The exit status is 1 if anything is missing.

The sandbox is checked for real: a child process confines itself exactly as
a vTPM instance does and tries what an instance must not be able to do.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if probe {
				if po.DataRoot == "" {
					po.DataRoot = paths.DataRoot()
				}
				return hostcheck.Probe(cmd.OutOrStdout(), po)
			}
			exe, _ := os.Executable()
			cs := hostcheck.Run(cmd.Context(), hostcheck.Options{DataRoot: paths.DataRoot(), HostTPM: os.Getenv("VTPM_HOST_TPM"), Exe: exe})
			checks := make([]check, len(cs))
			for i, c := range cs {
				checks[i] = check{Name: c.Name, Status: string(c.Status), Detail: c.Detail, Fix: renderFix(c.Fix)}
			}
			return printChecks(cmd.OutOrStdout(), checks, asJSON)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the checks as JSON")
	cmd.Flags().BoolVar(&probe, "probe-sandbox", false, "confine this process as an instance and report what it can still do")
	cmd.Flags().StringVar(&po.StateDir, "state", "", "the probe's state directory (with --probe-sandbox)")
	cmd.Flags().StringVar(&po.DataRoot, "data-root", "", "the probe's data root (with --probe-sandbox; default: the host's)")
	cmd.Flags().StringVar(&po.Connect, "connect", "", "a listening HOST:PORT the probe tries to connect to (with --probe-sandbox)")
	cmd.Flags().BoolVar(&po.TryExec, "try-exec", false, "make the probe execute a program once confined: the filter kills it (with --probe-sandbox)")
	for _, f := range []string{"probe-sandbox", "state", "data-root", "connect", "try-exec"} {
		cmd.Flags().MarkHidden(f)
	}
	return cmd
}

// renderFix is a check's remedies on one line.
func renderFix(rs []errdefs.Remedy) string {
	parts := make([]string, len(rs))
	for i, r := range rs {
		parts[i] = renderRemedy(r)
	}
	return strings.Join(parts, "; ")
}

func printChecks(w io.Writer, checks []check, asJSON bool) error {
	missing := 0
	for _, c := range checks {
		if c.Status == statusMissing {
			missing++
		}
	}
	if asJSON {
		if err := printJSON(w, checks); err != nil {
			return err
		}
	} else {
		for _, c := range checks {
			fmt.Fprintf(w, "%-8s %-20s %s\n", c.Status, c.Name, c.Detail)
			if c.Fix != "" {
				fmt.Fprintf(w, "%-8s %-20s fix: %s\n", "", "", c.Fix)
			}
		}
	}
	if missing > 0 {
		return fmt.Errorf("%d of %d checks missing", missing, len(checks))
	}
	return nil
}
