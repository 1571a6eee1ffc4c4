package main

import (
	"io"
	"os"

	"github.com/spf13/cobra"

	"vtpm/internal/manufacture"
	"vtpm/internal/swtpm"
)

const setupUsage = `TPM emulator setup tool version ` + swtpm.Version + ` (vtpm)
Usage: swtpm_setup [options]

vtpm manufactures the TPM in-process (no swtpm, swtpm_localca or certtool);
certificates come from this host's local CA (` + "`vtpm ca show --pem`" + `).

` + swtpm.SetupOptionsUsage

// runSwtpmSetup is `swtpm_setup …`; it returns the exit code.
func runSwtpmSetup(args []string, stdout, stderr io.Writer) int {
	setup := func(o *swtpm.SetupOptions) (*manufacture.SetupResult, error) {
		return manufacture.Setup(o, openBroker, warnLogger())
	}
	return manufacture.SetupProgram{Usage: setupUsage, Version: version, Setup: setup}.Run(args, stdout, stderr)
}

func swtpmSetupCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "swtpm_setup [options]",
		Short: "Manufacture a vTPM with swtpm_setup's command line (drop-in for swtpm_setup)",
		Long: `Manufacture a vTPM in-process with swtpm_setup 0.7.1's command line, so libvirt
creates vTPMs through vtpm without knowing it. The binary behaves the same when
invoked under the name "swtpm_setup".`,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			os.Exit(runSwtpmSetup(args, cmd.OutOrStdout(), cmd.ErrOrStderr()))
			return nil
		},
	}
}
