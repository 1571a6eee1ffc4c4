package main

import (
	"maps"
	"os"
	"strings"
	"testing"

	"vtpm/internal/testutil"
)

// TestOverwriteRunningTPM: --overwrite on a TPM that is running takes the
// TPM's lock before removing anything, so it is refused and the state
// directory is left exactly as it was (the TPM's state, identity and key
// protector included), for `vtpm tpm manufacture` and `swtpm_setup`.
func TestOverwriteRunningTPM(t *testing.T) {
	dir := setupEnv(t)
	if out, err := runVTPM(t, "tpm", "manufacture", dir); err != nil {
		t.Fatalf("tpm manufacture: %v\n%s", err, out)
	}
	run := startTPM(t, testutil.Binary(t), os.Getenv("VTPM_HOME"), dir)
	defer run.shutdown(t)
	before := snapshot(t, dir)
	if len(before) == 0 {
		t.Fatal("the manufactured TPM left no files")
	}
	tests := []struct {
		name string
		run  func() (failed bool, out string)
	}{
		{"tpm manufacture --overwrite", func() (bool, string) {
			out, err := runVTPM(t, "tpm", "manufacture", dir, "--overwrite")
			if err != nil {
				out += formatError(err)
			}
			return err != nil, out
		}},
		{"swtpm_setup --overwrite", func() (bool, string) {
			code, stdout, stderr := setup(t, "--tpm2", "--tpm-state", dir, "--createek", "--overwrite")
			return code != 0, stdout + stderr
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			failed, out := tc.run()
			if !failed {
				t.Fatalf("%s on a running TPM succeeded:\n%s", tc.name, out)
			}
			if !strings.Contains(out, "in use by another TPM process") {
				t.Errorf("output does not say the TPM is in use:\n%s", out)
			}
			if after := snapshot(t, dir); !maps.EqualFunc(before, after, func(a, b []byte) bool { return string(a) == string(b) }) {
				t.Errorf("the state directory changed: before %v, after %v", keysOf(before), keysOf(after))
			}
		})
	}
}

func keysOf(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
