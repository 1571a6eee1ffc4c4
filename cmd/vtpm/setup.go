package main

import (
	"io"
	"os"

	"github.com/spf13/cobra"

	"vtpm/internal/hostsvc"
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
		res, err := manufacture.SetupOn(o, hostsvc.SetupHost(o.StateDir, warnLogger()), warnLogger())
		return res, rendered(err)
	}
	return manufacture.SetupProgram{Usage: setupUsage, Version: version, Setup: setup}.Run(args, stdout, stderr)
}

// rendered is err with its remedies in its message, as the CLI prints
// them, for swtpm_setup's log (which prints errors as they are).
func rendered(err error) error {
	if err == nil {
		return nil
	}
	return &renderedError{err}
}

type renderedError struct{ err error }

func (e *renderedError) Error() string { return formatError(e.err) }
func (e *renderedError) Unwrap() error { return e.err }

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
