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
		Use:   "swtpm socket|chardev [options]",
		Short: "Run a vTPM with swtpm's command line (drop-in for swtpm socket and chardev)",
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

// interfaces follows a refused interface: the ones vtpm implements.
const interfaces = "vtpm implements 'swtpm socket' and 'swtpm chardev' (not cuse)\n"

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
	parse, usage := swtpm.Parse, swtpm.Usage
	switch {
	case len(args) > 0 && args[0] == "chardev":
		parse, usage = swtpm.ParseChardev, swtpm.ChardevUsage
	case len(args) == 0:
		fmt.Fprintf(stderr, "Missing TPM interface type.\n%s", interfaces)
		return 1
	case args[0] != "socket":
		// swtpm's words: clients (swtpm's own tests among them) look for
		// them to learn which interfaces there are.
		fmt.Fprintf(stderr, "Unsupported TPM interface type '%s'.\n%s", args[0], interfaces)
		return 1
	}
	opts, ext, err := parse(args[1:], os.Getenv)
	if err != nil {
		fmt.Fprintf(stderr, "swtpm: %v\n\n%s", err, usage)
		return 1
	}
	switch {
	case opts.ShowHelp:
		fmt.Fprint(stdout, usage)
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
