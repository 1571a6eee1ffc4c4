// Package paths locates the host's vtpm data root.
package paths

import (
	"os"
	"path/filepath"
)

// DataRoot is where this host keeps its vtpm data: $VTPM_HOME if set,
// /var/lib/vtpm for root, else $XDG_DATA_HOME/vtpm (~/.local/share/vtpm).
func DataRoot() string {
	if d := os.Getenv("VTPM_HOME"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/vtpm"
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "vtpm")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "vtpm-"+os.Getenv("USER"))
	}
	return filepath.Join(home, ".local", "share", "vtpm")
}
