package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"vtpm/internal/errdefs"
)

// The host service and its API clients live in vtpm-hostd: every vTPM is a
// vtpm process, and would pay the API's and the metrics' dependencies at
// each start. vtpm hands those commands over, arguments unchanged, the way
// git runs its helpers.
const hostHelper = "vtpm-hostd"

// forwardCmd is a command that helper performs: vtpm replaces itself with
// `helper ARGS…`, its own arguments passed through.
func forwardCmd(helper, use, short string) *cobra.Command {
	return &cobra.Command{
		Use:                use,
		Short:              short,
		DisableFlagParsing: true, // the helper parses them, and answers --help
		RunE: func(*cobra.Command, []string) error {
			return forward(helper, os.Args[1:])
		},
	}
}

// forward execs helper with args; it returns only on failure.
func forward(helper string, args []string) error {
	path, err := findHelper(helper)
	if err != nil {
		return err
	}
	err = syscall.Exec(path, append([]string{helper}, args...), os.Environ())
	return errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "run %s", path)
}

// findHelper looks for helper beside vtpm's own executable, then in PATH.
func findHelper(helper string) (string, error) {
	var beside string
	if exe, err := os.Executable(); err == nil {
		if resolved, err := filepath.EvalSymlinks(exe); err == nil {
			exe = resolved
		}
		beside = filepath.Join(filepath.Dir(exe), helper)
		if fi, err := os.Stat(beside); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return beside, nil
		}
	}
	path, err := exec.LookPath(helper)
	if err == nil {
		return path, nil
	}
	if errors.Is(err, exec.ErrDot) {
		return "", errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "%s is found only in the current directory, which is not trusted", helper)
	}
	return "", errdefs.New(errdefs.ErrNotFound, "this command is %s's, which is neither beside vtpm (%s) nor in PATH", helper, beside).
		With(errdefs.Do(errdefs.ActionBuild).WithNote("build it with vtpm, from vtpm's source tree"),
			errdefs.Advise("or install it beside vtpm (make install puts both in the same directory)"))
}
