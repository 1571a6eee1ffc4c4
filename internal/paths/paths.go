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

// HostDataRoot is the data root of a vTPM process (swtpm, swtpm_setup):
// $VTPM_HOME if set, else the host's, /var/lib/vtpm, whoever runs it.
// Never one derived from $HOME: libvirt starts them as its swtpm user
// (tss) with the HOME it inherited (/root), and a vTPM must find the host's
// keystore (or, when it cannot open it, the host service), not one of its
// own.
func HostDataRoot() string {
	if d := os.Getenv("VTPM_HOME"); d != "" {
		return d
	}
	return "/var/lib/vtpm"
}
