package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"vtpm/internal/instance"
	"vtpm/internal/swtpm"
)

func swtpmCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "swtpm socket [options]",
		Short: "Run a vTPM with swtpm's command line (drop-in for swtpm socket)",
		Long: `Run one vTPM process that speaks swtpm 0.7.1's control and data protocol, so
QEMU, libvirt, swtpm_setup, swtpm_ioctl and tpm2-tools use it unchanged. The
binary behaves the same when invoked under the name "swtpm".`,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			os.Exit(runSwtpm(args, cmd.OutOrStdout(), cmd.ErrOrStderr()))
			return nil
		},
	}
}

// runSwtpm is `swtpm …`: it returns the process exit code, as swtpm's do.
func runSwtpm(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && (args[0] == "-v" || args[0] == "--version") {
		fmt.Fprintf(stdout, "TPM emulator version %s, vtpm %s\n", swtpm.Version, version)
		return 0
	}
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
		fmt.Fprint(stdout, swtpm.Usage)
		return 0
	}
	if len(args) == 0 || args[0] != "socket" {
		what := "no interface given"
		if len(args) > 0 {
			what = fmt.Sprintf("interface %q is not supported", args[0])
		}
		fmt.Fprintf(stderr, "swtpm: %s; vtpm implements 'swtpm socket'\n", what)
		return 1
	}
	opts, ext, err := swtpm.Parse(args[1:], os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "swtpm: %v\n\n%s", err, swtpm.Usage)
		return 1
	}
	switch {
	case opts.ShowHelp:
		fmt.Fprint(stdout, swtpm.Usage)
		return 0
	case opts.ShowVersion:
		fmt.Fprintf(stdout, "TPM emulator version %s, vtpm %s\n", swtpm.Version, version)
		return 0
	case opts.PrintCaps:
		fmt.Fprintln(stdout, swtpm.CapabilitiesJSON())
		return 0
	}
	return instance.Serve(opts, ext, stdout, stderr, formatError)
}
