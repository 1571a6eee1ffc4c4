package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

const setupSection = "7. Full manufacture: `swtpm_setup` (fresh state dir)"

// setupArgs is the full manufacture both tools are timed on: EKs, both EK
// certificates, the platform certificate, NV locked.
var setupArgs = []string{"--tpm2", "--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--overwrite"}

// setupTool is one way of running swtpm_setup.
type setupTool struct {
	argv []string // the command up to the options
	env  []string // the whole environment
}

// run manufactures a TPM in a fresh state directory under base and returns
// the wall time and the CPU time of the process and the children it waited
// for.
func (t setupTool) run(base string) (wall, cpu time.Duration, err error) {
	d, err := os.MkdirTemp(base, "setup-")
	if err != nil {
		return 0, 0, fmt.Errorf("create state directory: %w", err)
	}
	defer os.RemoveAll(d)
	args := append(append(t.argv[1:len(t.argv):len(t.argv)], setupArgs...), "--tpm-state", d)
	c := exec.Command(t.argv[0], args...)
	c.Env = t.env
	var out bytes.Buffer
	c.Stdout, c.Stderr = &out, &out
	t0 := time.Now()
	err = c.Run()
	wall = time.Since(t0)
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %w: %s", strings.Join(c.Args, " "), err, bytes.TrimSpace(out.Bytes()))
	}
	return wall, c.ProcessState.UserTime() + c.ProcessState.SystemTime(), nil
}

// setup is measurement 7: a full manufacture with `vtpm swtpm_setup`
// against swtpm's swtpm_setup, each on a fresh state directory.
func (b *bench) setup() ([]row, error) {
	if b.swtpmSetup == "" {
		return []row{{section: setupSection, skip: "swtpm_setup was not found (give -swtpm-setup), so there is nothing to compare with"}}, nil
	}
	// swtpm_setup runs the swtpm it finds in PATH: make it the one beside
	// swtpm_setup (and so the one measured above when both come from the
	// same package).
	swEnv := append(os.Environ(), "PATH="+filepath.Dir(b.swtpmSetup)+string(os.PathListSeparator)+os.Getenv("PATH"))
	vtEnv := append(os.Environ(), "VTPM_HOME="+filepath.Join(b.base, "setup-home"), "VTPM_HOST_TPM=none")
	tools := [2]setupTool{
		{argv: []string{b.swtpmSetup}, env: swEnv},
		{argv: []string{b.impls[1].argv[0], "swtpm_setup"}, env: vtEnv},
	}
	b.progress("full manufacture (swtpm_setup): %d × 2", b.cfg.setups)
	var wall, cpu [2][]float64
	// One unrecorded pair first: vtpm creates its keystore on first use.
	for i := -1; i < b.cfg.setups; i++ {
		for _, k := range order(i + 1) {
			w, c, err := tools[k].run(b.base)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", b.impls[k].name, err)
			}
			if i >= 0 {
				wall[k] = append(wall[k], scaled(w, time.Millisecond))
				cpu[k] = append(cpu[k], scaled(c, time.Millisecond))
			}
		}
	}
	return []row{
		{
			section: setupSection, name: "full manufacture, wall time", unit: "ms", s: wall, target: 1.0 / 3,
			note: "swtpm_setup runs swtpm and, for each certificate, swtpm_localca and swtpm_cert as separate processes; `vtpm swtpm_setup` does all of it in one process",
		},
		{section: setupSection, name: "full manufacture, CPU time (user + system, with waited-for child processes)", unit: "ms", s: cpu},
	}, nil
}
