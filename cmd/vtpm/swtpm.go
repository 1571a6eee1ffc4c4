package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

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
	log, closeLog, err := instance.OpenLog(opts.Log, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "swtpm: %v\n", err)
		return 1
	}
	defer closeLog()
	if opts.PrintStates {
		if err := instance.PrintStates(opts, log, stdout); err != nil {
			fmt.Fprintf(stderr, "swtpm: %v\n", err)
			return 1
		}
		return 0
	}
	if opts.Daemon && !instance.InDaemon() {
		if err := instance.Daemonize(stderr); err != nil {
			if !errors.Is(err, instance.ErrDaemonExited) {
				fmt.Fprintf(stderr, "swtpm: %v\n", err)
			}
			return 1
		}
		return 0
	}
	// Errors go to stderr, and also to the log when it is a separate file.
	logToo := (opts.Log.File != "" && opts.Log.File != "-") || opts.Log.FD >= 0
	in, err := instance.New(opts, ext, log)
	if err != nil {
		if logToo {
			log.Error("cannot start the vTPM", "err", formatError(err))
		}
		fmt.Fprintf(stderr, "swtpm: %s\n", formatError(err))
		return 1
	}
	in.OnReady = instance.NotifyParent
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := in.Run(ctx); err != nil {
		if logToo {
			log.Error("vTPM stopped with an error", "err", err)
		}
		fmt.Fprintf(stderr, "swtpm: %v\n", err)
		return 1
	}
	return 0
}
