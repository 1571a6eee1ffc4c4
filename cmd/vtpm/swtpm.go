package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"vtpm/internal/instance"
	"vtpm/internal/swtpm"
)

const daemonEnv = "VTPM_DAEMON_NOTIFY_FD"

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
	log, closeLog, err := openLog(opts.Log, stderr)
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
	if opts.Daemon && os.Getenv(daemonEnv) == "" {
		return daemonize(stderr)
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
	in.OnReady = notifyParent
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

// openLog honours --log file=|fd=,level=. Without it only warnings go to stderr.
func openLog(l swtpm.Log, stderr io.Writer) (*slog.Logger, func(), error) {
	w, closer := stderr, func() {}
	level := slog.LevelWarn
	switch {
	case l.File != "" && l.File != "-":
		flag := os.O_WRONLY | os.O_CREATE | os.O_APPEND
		if l.Truncate {
			flag = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
		}
		f, err := os.OpenFile(l.File, flag, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("--log: open %s: %w", l.File, err)
		}
		w, closer = f, func() { f.Close() }
	case l.FD >= 0:
		w = os.NewFile(uintptr(l.FD), "log")
	}
	if l.Level >= 1 {
		level = slog.LevelInfo
	}
	if l.Level >= 5 {
		level = slog.LevelDebug
	}
	h := slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})
	log := slog.New(h)
	if l.Prefix != "" {
		log = log.With("prefix", l.Prefix)
	}
	return log, closer, nil
}

// daemonize re-executes the program in a new session (Go cannot fork) and
// returns once the child reports that it is serving, as swtpm -d does.
func daemonize(stderr io.Writer) int {
	r, w, err := os.Pipe()
	if err != nil {
		fmt.Fprintf(stderr, "swtpm: daemonize: %v\n", err)
		return 1
	}
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "swtpm: daemonize: %v\n", err)
		return 1
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", daemonEnv, 3))
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(stderr, "swtpm: daemonize: %v\n", err)
		return 1
	}
	w.Close()
	buf := make([]byte, 1)
	if n, _ := r.Read(buf); n == 1 {
		return 0
	}
	cmd.Wait()
	return 1
}

// notifyParent tells a waiting daemonize parent that the vTPM is serving.
func notifyParent() {
	if os.Getenv(daemonEnv) == "" {
		return
	}
	f := os.NewFile(3, "notify")
	f.Write([]byte{1})
	f.Close()
	os.Unsetenv(daemonEnv)
	if devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0); err == nil {
		for _, fd := range []int{0, 1, 2} {
			syscall.Dup2(int(devnull.Fd()), fd)
		}
		devnull.Close()
	}
}
