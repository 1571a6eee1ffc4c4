package manufacture

import (
	"fmt"
	"io"
	"os"

	"vtpm/internal/swtpm"
)

// SetupProgram is swtpm_setup as a program.
type SetupProgram struct {
	Usage   string // printed for --help and after an option it refuses
	Version string // vtpm's, printed beside swtpm's
	// Setup does what a command line that is not informational asks for
	// (see [Setup]: the caller chooses the keys it manufactures with).
	Setup func(*swtpm.SetupOptions) (*SetupResult, error)
}

// Run runs swtpm_setup with args (its command line after the program's
// name) and returns the exit code. Its log goes to --logfile when given,
// else messages to stdout and errors to stderr.
func (p SetupProgram) Run(args []string, stdout, stderr io.Writer) int {
	o, err := swtpm.ParseSetup(args)
	if err != nil {
		fmt.Fprintf(stderr, "swtpm_setup: %v\n", err)
		fmt.Fprint(stdout, p.Usage)
		return 1
	}
	switch {
	case o.Help:
		fmt.Fprint(stdout, p.Usage)
		return 0
	case o.Version:
		fmt.Fprintf(stdout, "TPM emulator setup tool version %s, vtpm %s\n", swtpm.Version, p.Version)
		return 0
	case o.PrintCaps:
		fmt.Fprintln(stdout, swtpm.SetupCapabilitiesJSON)
		return 0
	case o.CreateConfigFiles:
		return 0
	}
	if o.Logfile != "" && o.Logfile != "-" {
		f, err := os.OpenFile(o.Logfile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			fmt.Fprintf(stderr, "Could not open logfile %s: %v\n", o.Logfile, err)
			return 1
		}
		defer f.Close()
		stdout, stderr = f, f
	}
	res, err := p.Setup(o)
	res.WriteLog(stdout, stderr, err)
	if err != nil {
		return 1
	}
	return 0
}
