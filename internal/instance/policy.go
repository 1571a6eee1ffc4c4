package instance

import (
	"os"
	"path/filepath"
	"slices"
	"strings"

	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm"
	"vtpm/internal/swtpm/subopt"
)

// SandboxPolicy is the sandbox policy of the instance that opts describe,
// under isolation policy iso. Of the data root it may write only
// keystoreFiles, which must exist: its TPM's generation record (never the
// keystore's other records, nor other TPMs'). The sandbox probe
// (hostcheck.Probe) builds its policy here too, so what it proves holds for
// instances.
func SandboxPolicy(opts *swtpm.Options, iso sandbox.Isolation, keystoreFiles ...string) *sandbox.Policy {
	p := &sandbox.Policy{Isolation: iso, Seccomp: opts.Seccomp}
	abs := func(path string) string {
		if a, err := filepath.Abs(path); err == nil {
			return a
		}
		return path
	}
	addDir := func(list *[]string, dir string) {
		if dir = abs(dir); !slices.Contains(*list, dir) {
			*list = append(*list, dir)
		}
	}
	if opts.StateDir != "" {
		addDir(&p.WriteDirs, opts.StateDir)
	}
	for _, f := range keystoreFiles {
		if f == "" {
			continue // no file of the data root: the host service handed the record over
		}
		if f = abs(f); !slices.Contains(p.WriteFiles, f) {
			p.WriteFiles = append(p.WriteFiles, f)
		}
	}
	// swtpm's file backend: an existing file or block device is written in
	// place; a new file is made beside the others.
	if opts.StateFile != "" {
		if _, err := os.Stat(opts.StateFile); err == nil {
			p.WriteFiles = append(p.WriteFiles, abs(opts.StateFile))
		} else {
			addDir(&p.RuntimeDirs, filepath.Dir(opts.StateFile))
		}
	}
	if opts.Device != "" { // swtpm chardev --chardev
		p.WriteFiles = append(p.WriteFiles, abs(opts.Device))
	}
	if opts.RunAs != "" {
		if uid, gid, err := sandbox.LookupUser(opts.RunAs); err == nil {
			p.DirOwner = &[2]int{uid, gid}
		}
	}
	for _, e := range []*swtpm.Endpoint{opts.Ctrl, opts.Server} {
		switch {
		case e == nil || e.FD >= 0 || e.ClientFD >= 0:
		case e.Type == "unixio" && e.Path != "":
			addDir(&p.RuntimeDirs, filepath.Dir(e.Path))
		case e.Type == "tcp" && e.Port > 0 && e.Port <= 65535:
			p.BindTCP = append(p.BindTCP, uint16(e.Port))
		}
	}
	if opts.PidFile != "" {
		addDir(&p.RuntimeDirs, filepath.Dir(opts.PidFile))
	}
	// --key file=…,remove deletes the key file once read.
	for _, k := range []string{opts.Key, opts.MigrationKey} {
		if o, err := subopt.Parse(k, "file", "fd", "pwdfile", "pwdfd", "mode", "format", "remove", "kdf"); err == nil {
			if r, ok := o["remove"]; ok && r != "false" {
				for _, src := range []string{o["file"], o["pwdfile"]} {
					if src != "" {
						addDir(&p.RuntimeDirs, filepath.Dir(src))
					}
				}
			}
		}
	}
	if opts.Log.File != "" && opts.Log.File != "-" {
		p.WriteFiles = append(p.WriteFiles, abs(opts.Log.File))
	}
	// The host keystore may be sealed to this host's TPM.
	devs := []string{os.DevNull, "/dev/tpmrm0", "/dev/tpm0"}
	if d, ok := strings.CutPrefix(os.Getenv("VTPM_HOST_TPM"), "device:"); ok {
		devs = append(devs, d)
	}
	for _, d := range devs {
		if _, err := os.Stat(d); err == nil && !slices.Contains(p.WriteFiles, d) {
			p.WriteFiles = append(p.WriteFiles, d)
		}
	}
	return p
}
