package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"vtpm/internal/testutil"
)

// fullManufacture is the full manufacture both tools are timed on: RSA and
// ECC EKs, both EK certificates, the platform certificate, NV locked.
var fullManufacture = []string{"--tpm2", "--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--overwrite"}

// BenchmarkSwtpmSetup times `vtpm swtpm_setup` against swtpm 0.7.1's
// swtpm_setup (which runs swtpm, swtpm_localca and swtpm_cert) with the same
// options, each as a fresh process on a fresh state directory:
//
//	go test -run '^$' -bench SwtpmSetup -benchtime 20x ./cmd/vtpm
func BenchmarkSwtpmSetup(b *testing.B) {
	home := b.TempDir()
	b.Setenv("VTPM_HOME", home)
	b.Setenv("VTPM_HOST_TPM", "none")
	tools := []struct {
		name string
		cmd  []string
	}{
		{"vtpm", []string{testutil.Binary(b), "swtpm_setup"}},
		{"swtpm_setup", []string{"/usr/bin/swtpm_setup"}},
	}
	for _, tool := range tools {
		b.Run(tool.name, func(b *testing.B) {
			if _, err := os.Stat(tool.cmd[0]); err != nil {
				b.Skipf("%s: %v", tool.cmd[0], err)
			}
			if tool.name == "swtpm_setup" {
				// swtpm_setup finds swtpm in PATH: make sure it is swtpm's.
				b.Setenv("PATH", "/usr/bin:/bin")
			}
			for i := 0; b.Loop(); i++ {
				b.StopTimer()
				dir := filepath.Join(b.TempDir(), "tpm")
				if err := os.Mkdir(dir, 0o700); err != nil {
					b.Fatal(err)
				}
				args := append(append(tool.cmd[1:len(tool.cmd):len(tool.cmd)], fullManufacture...), "--tpm-state", dir, "--logfile", filepath.Join(dir, "..", "log"))
				c := exec.Command(tool.cmd[0], args...)
				b.StartTimer()
				if out, err := c.CombinedOutput(); err != nil {
					log, _ := os.ReadFile(filepath.Join(dir, "..", "log"))
					b.Fatalf("%s: %v\n%s%s", tool.name, err, out, log)
				}
			}
		})
	}
}
