package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"

	"vtpm/internal/errdefs"
	"vtpm/internal/progress"
)

// confirm asks on the terminal before what cannot be undone; yes (--yes)
// answers for scripts. Without a terminal and without --yes it refuses, so
// that no script deletes by accident.
func confirm(in io.Reader, out io.Writer, question string, yes bool) error {
	if yes {
		return nil
	}
	f, ok := in.(*os.File)
	if !ok || !progress.IsTerminal(f) {
		return errdefs.New(errdefs.ErrFailedPrecondition, "%s: not confirmed (no terminal to ask on); give --yes to confirm", question)
	}
	fmt.Fprintf(out, "%s [y/N] ", question)
	line, _ := bufio.NewReader(in).ReadString('\n')
	switch strings.ToLower(strings.TrimSpace(line)) {
	case "y", "yes":
		return nil
	}
	return errdefs.New(errdefs.ErrFailedPrecondition, "%s: not confirmed; nothing was changed", question)
}
