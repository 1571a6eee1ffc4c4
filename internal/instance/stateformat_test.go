package instance_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/testutil"
)

// TestExplicitSwtpmFormat: with swtpm's format asked for (--tpmstate
// format=swtpm), vtpm keeps a new TPM in swtpm's files with swtpm's
// semantics, side by side with swtpm itself: tpm2-00.permall and nothing
// of sealed state; a restart without the option keeps the format; a TPM
// whose permall was deleted starts as a new, empty TPM. Asking for the
// other format than a directory holds is refused with the way out.
func TestExplicitSwtpmFormat(t *testing.T) {
	t.Parallel()
	needTools(t)
	nv := []byte("swtpm's files")
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			dir := shortDir(t)
			home := filepath.Join(dir, "home")
			stateDir := filepath.Join(dir, "state")
			if err := os.Mkdir(stateDir, 0o700); err != nil {
				t.Fatal(err)
			}
			var ask []string
			if im == ourVtpm {
				ask = []string{"--tpmstate", "dir=" + stateDir + ",format=swtpm"} // the last --tpmstate wins
			}
			p := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, stateDir: stateDir, home: home, args: ask})
			p.mustIoctl(t, "-i")
			p.tpm2(t, "tpm2_startup", "-c")
			p.defineWriteNV(t, nv)
			p.tpm2(t, "tpm2_shutdown", "-c")
			p.shutdown(t)
			var names []string
			entries, _ := os.ReadDir(stateDir)
			for _, e := range entries {
				names = append(names, e.Name())
			}
			if got := strings.Join(names, " "); got != ".lock tpm2-00.permall" {
				t.Errorf("state directory holds %q, want swtpm's %q", got, ".lock tpm2-00.permall")
			}

			q := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, stateDir: stateDir, home: home})
			q.mustIoctl(t, "-i")
			q.tpm2(t, "tpm2_startup", "-c")
			if got := q.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("NV after a restart: %q, want %q", got, nv)
			}
			q.shutdown(t)

			if im == ourVtpm {
				out, err := testutil.RunErr([]string{"VTPM_HOME=" + home}, testutil.Binary(t), "swtpm", "socket", "--tpm2",
					"--tpmstate", "dir="+stateDir+",format=sealed", "--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl2"))
				if exitCode(t, err) != 1 || !strings.Contains(out, "holds swtpm state") || !strings.Contains(out, "vtpm state import "+stateDir) {
					t.Errorf("format=sealed on swtpm's files: %v, want exit 1 naming the import:\n%s", err, out)
				}
			}

			if err := os.Remove(filepath.Join(stateDir, "tpm2-00.permall")); err != nil {
				t.Fatal(err)
			}
			r := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, stateDir: stateDir, home: home, args: ask})
			r.mustIoctl(t, "-i")
			r.tpm2(t, "tpm2_startup", "-c")
			if out, err := r.tpm2Err("tpm2_nvread", testNVIndex, "-C", "o", "-s", "1"); err == nil {
				t.Errorf("the NV index outlived its deleted permall: %s", out)
			}
			r.shutdown(t)
		})
	}
}

// TestExplicitFormatOnSealedState: swtpm's format asked for (option or
// VTPM_STATE_FORMAT) on a directory that holds sealed state is refused,
// and the sealed state is left as it was.
func TestExplicitFormatOnSealedState(t *testing.T) {
	t.Parallel()
	needTools(t)
	p := startTPM(t, ourVtpm, tpmConfig{transport: tcpDataUnixCtrl})
	p.mustIoctl(t, "-i")
	p.shutdown(t)
	for _, tc := range []struct {
		name string
		env  string
		opt  string
	}{{"option", "", ",format=swtpm"}, {"environment", "swtpm", ""}} {
		env := []string{"VTPM_HOME=" + filepath.Join(p.dir, "home"), "VTPM_STATE_FORMAT=" + tc.env}
		out, err := testutil.RunErr(env, testutil.Binary(t), "swtpm", "socket", "--tpm2",
			"--tpmstate", "dir="+p.stateDir+tc.opt, "--ctrl", "type=unixio,path="+filepath.Join(p.dir, "ctrl2"))
		if exitCode(t, err) != 1 || !strings.Contains(out, "holds sealed state") {
			t.Errorf("%s: swtpm format on sealed state: %v, want exit 1 saying it holds sealed state:\n%s", tc.name, err, out)
		}
		if _, err := os.Stat(filepath.Join(p.stateDir, "tpm2-00.permall")); err == nil {
			t.Errorf("%s: swtpm's files appeared beside sealed state", tc.name)
		}
	}
}
