package instance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/signal"
	"syscall"

	"vtpm/internal/swtpm"
)

// Serve runs the vTPM that opts and ext describe until SIGTERM or SIGINT,
// as `swtpm socket` does once its informational options are answered: it
// opens the --log, answers --print-states, goes to the background with -d,
// then serves. Failures go to stderr as swtpm reports them, and to the log
// too when that is a file of its own; describe renders an error that
// refused the start, with its remedies. It returns the exit code.
func Serve(opts *swtpm.Options, ext *swtpm.Extensions, stdout, stderr io.Writer, describe func(error) string) int {
	log, closeLog, err := OpenLog(opts.Log, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "swtpm: %v\n", err)
		return 1
	}
	defer closeLog()
	if opts.PrintStates {
		if err := PrintStates(opts, ext, log, stdout); err != nil {
			fmt.Fprintf(stderr, "swtpm: %v\n", err)
			return 1
		}
		return 0
	}
	if opts.Daemon && !InDaemon() {
		if err := Daemonize(stderr); err != nil {
			if !errors.Is(err, ErrDaemonExited) {
				fmt.Fprintf(stderr, "swtpm: %v\n", err)
			}
			return 1
		}
		return 0
	}
	// Errors go to stderr, and also to the log when it is a separate file.
	logToo := (opts.Log.File != "" && opts.Log.File != "-") || opts.Log.FD >= 0
	in, err := New(opts, ext, log)
	if err != nil {
		if logToo {
			log.Error("cannot start the vTPM", "err", describe(err))
		}
		fmt.Fprintf(stderr, "swtpm: %s\n", describe(err))
		return 1
	}
	in.OnReady = NotifyParent
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
