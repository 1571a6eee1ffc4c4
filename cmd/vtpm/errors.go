package main

import (
	"vtpm/internal/clirender"
	"vtpm/internal/errdefs"
)

// formatError is err's message followed by its remedies, one per line
// (internal/clirender, shared with vtpm's other executables).
func formatError(err error) string { return clirender.Error(err) }

// renderRemedy is one remedy as a line of prose with its command in
// backquotes.
func renderRemedy(r errdefs.Remedy) string { return clirender.Remedy(r) }
