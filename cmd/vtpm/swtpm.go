package main

import (
	"io"
	"os"

	"github.com/spf13/cobra"

	"vtpm/internal/instance"
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

// runSwtpm is `swtpm …`: it returns the process exit code, as swtpm's do.
func runSwtpm(args []string, stdout, stderr io.Writer) int {
	return instance.Main(args, stdout, stderr, version, formatError)
}
