package instance

import (
	"fmt"
	"io"
	"os"

	"vtpm/internal/swtpm"
)

// interfaces follows a refused interface: the ones vtpm implements.
const interfaces = "vtpm implements 'swtpm socket' and 'swtpm chardev' (not cuse)\n"

// Main is the swtpm program: args is its command line after the program's
// name, the interface first; version is vtpm's, printed beside swtpm's. It
// answers the informational options, then serves the interface (see
// [Serve]); describe renders an error that refused the start. It returns
// the exit code, as swtpm's.
func Main(args []string, stdout, stderr io.Writer, version string, describe func(error) string) int {
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
	return Serve(opts, ext, stdout, stderr, describe)
}
