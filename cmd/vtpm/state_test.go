package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"vtpm/internal/testutil"
)

// These tests run the real swtpm 0.7.1 to create state the way libvirt's
// VMs have it, import it with the vtpm binary, and serve it with vtpm.

const (
	nvIndex = "0x1500016"
	pcr     = "16"
)

// tpmRun is a running TPM process on unix sockets, reachable by
// swtpm_ioctl (ctrl) and tpm2-tools (swtpm:path=).
type tpmRun struct {
	*testutil.Proc
	sock string
}

// shortDir keeps unix socket paths under the 108-byte limit.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vsi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startTPM starts exe ("swtpm" or the vtpm binary) on stateDir, stopped.
func startTPM(t *testing.T, exe, home, stateDir string, args ...string) *tpmRun {
	t.Helper()
	sock := filepath.Join(shortDir(t), "tpm")
	args = append([]string{"--tpm2", "--tpmstate", "dir=" + stateDir,
		"--server", "type=unixio,path=" + sock, "--ctrl", "type=unixio,path=" + sock + ".ctrl"}, args...)
	p := testutil.Start(t, exe, []string{"VTPM_HOME=" + home}, sock, args...)
	if err := p.WaitReady(sock+".ctrl", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// The sockets exist before the state is opened and locked; the first
	// answer on the control channel says the TPM is running.
	r := &tpmRun{Proc: p, sock: sock}
	r.ioctl(t, "-c")
	return r
}

func (r *tpmRun) ioctl(t *testing.T, args ...string) {
	t.Helper()
	testutil.Run(t, nil, "swtpm_ioctl", append([]string{"--unix", r.sock + ".ctrl"}, args...)...)
}

func (r *tpmRun) tpm2(t *testing.T, tool string, args ...string) string {
	t.Helper()
	return testutil.Run(t, nil, tool, append([]string{"-T", "swtpm:path=" + r.sock}, args...)...)
}

// shutdown sends CMD_SHUTDOWN and waits for the process to exit.
func (r *tpmRun) shutdown(t *testing.T) {
	t.Helper()
	r.ioctl(t, "-s")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Wait(ctx); err != nil {
		t.Fatalf("TPM did not exit cleanly: %v\n%s", err, r.Stderr)
	}
}

func (r *tpmRun) readNV(t *testing.T, n int) []byte {
	t.Helper()
	f := filepath.Join(shortDir(t), "nv")
	r.tpm2(t, "tpm2_nvread", nvIndex, "-C", "o", "-s", strconv.Itoa(n), "-o", f)
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (r *tpmRun) readPCR(t *testing.T) string {
	t.Helper()
	for _, line := range strings.Split(r.tpm2(t, "tpm2_pcrread", "sha256:"+pcr), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), pcr+": 0x"); ok {
			return strings.ToLower(v)
		}
	}
	t.Fatal("no PCR in tpm2_pcrread output")
	return ""
}

var measurement = sha256.Sum256([]byte("kernel"))

// extendedPCR is PCR 16 after one extend of measurement from zeros.
func extendedPCR() string {
	sum := sha256.Sum256(append(make([]byte, 32), measurement[:]...))
	return hex.EncodeToString(sum[:])
}

// makeSwtpmState has the real swtpm create a TPM in dir (with keyArgs, its
// --key), write nv into an NV index and extend PCR 16. With volatile, the
// volatile state is stored too (CMD_STORE_VOLATILE), as a suspended VM has.
func makeSwtpmState(t *testing.T, dir string, nv []byte, volatile bool, keyArgs ...string) {
	t.Helper()
	sw := startTPM(t, "swtpm", "", dir, keyArgs...)
	sw.ioctl(t, "-i")
	sw.tpm2(t, "tpm2_startup", "-c")
	in := filepath.Join(shortDir(t), "nv")
	if err := os.WriteFile(in, nv, 0o600); err != nil {
		t.Fatal(err)
	}
	sw.tpm2(t, "tpm2_nvdefine", nvIndex, "-C", "o", "-s", strconv.Itoa(len(nv)), "-a", "ownerread|ownerwrite|authread|authwrite")
	sw.tpm2(t, "tpm2_nvwrite", nvIndex, "-C", "o", "-i", in)
	sw.tpm2(t, "tpm2_pcrextend", pcr+":sha256="+hex.EncodeToString(measurement[:]))
	if volatile {
		sw.ioctl(t, "-v")
	}
	sw.shutdown(t)
}

// snapshot maps every file under dir (relative path) to its contents.
func snapshot(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		files[rel] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// swtpmFiles keeps the snapshot's tpm2-00.* entries.
func swtpmFiles(s map[string][]byte) map[string][]byte {
	out := map[string][]byte{}
	for k, v := range s {
		if strings.HasPrefix(k, "tpm2-00.") {
			out[k] = v
		}
	}
	return out
}

func needStateTools(t *testing.T) {
	t.Helper()
	testutil.Need(t, "swtpm", "swtpm_ioctl", "tpm2_startup", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread", "tpm2_pcrextend", "tpm2_pcrread")
}

// TestStateImport imports swtpm state, plain and encrypted, in place and
// into another directory, and serves it with vtpm: the NV index written
// under swtpm reads back, and the swtpm files are kept byte for byte.
func TestStateImport(t *testing.T) {
	t.Parallel()
	needStateTools(t)
	vtpm := testutil.Binary(t)
	tests := []struct {
		name     string
		swtpmKey string // swtpm's --key; PWD stands for the passphrase file
		volatile bool   // the swtpm state includes tpm2-00.volatilestate
		toDest   bool   // --dest another directory
		dataKey  bool   // --data-key instead of the host key
		serveKey bool   // vtpm runs with swtpm's --key still given, as libvirt passes it
	}{
		{name: "plain in place"},
		{name: "aes-256-cbc pwdfile in place", swtpmKey: "pwdfile=PWD,mode=aes-256-cbc"},
		{name: "aes-256-cbc pwdfile with volatile state", swtpmKey: "pwdfile=PWD,mode=aes-256-cbc", volatile: true},
		{name: "aes-256-cbc served with --key still given", swtpmKey: "pwdfile=PWD,mode=aes-256-cbc", serveKey: true},
		{name: "aes-128 hex key file into --dest", swtpmKey: "file=PWD", toDest: true},
		{name: "plain with --data-key", dataKey: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			work := shortDir(t)
			home := filepath.Join(work, "home")
			src := filepath.Join(work, "tpm2")
			if err := os.Mkdir(src, 0o700); err != nil {
				t.Fatal(err)
			}
			var keyArgs []string
			if tc.swtpmKey != "" {
				pwd := filepath.Join(work, "secret")
				material := "a libvirt secret\n"
				if strings.HasPrefix(tc.swtpmKey, "file=") {
					material = "00112233445566778899aabbccddeeff\n"
				}
				if err := os.WriteFile(pwd, []byte(material), 0o600); err != nil {
					t.Fatal(err)
				}
				keyArgs = []string{"--key", strings.ReplaceAll(tc.swtpmKey, "PWD", pwd)}
			}
			nv := []byte("NV written under swtpm: " + tc.name)
			makeSwtpmState(t, src, nv, tc.volatile, keyArgs...)
			before := snapshot(t, src)
			originals := swtpmFiles(before)
			wantStates := 1
			if tc.volatile {
				wantStates = 2
			}
			if len(originals) != wantStates {
				t.Fatalf("swtpm left %v, want %d state files", slices.Sorted(maps.Keys(originals)), wantStates)
			}

			args := append([]string{"state", "import"}, keyArgs...)
			var serveArgs []string
			if tc.dataKey {
				dk := filepath.Join(work, "dek")
				if err := os.WriteFile(dk, []byte(strings.Repeat("5a", 32)+"\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--data-key", "file="+dk)
				serveArgs = append(serveArgs, "--data-key", "file="+dk)
			}
			if tc.serveKey {
				serveArgs = append(serveArgs, keyArgs...)
			}
			dest := src
			if tc.toDest {
				dest = filepath.Join(work, "sealed")
				args = append(args, "--dest", dest)
			}
			out := testutil.Run(t, []string{"VTPM_HOME=" + home}, vtpm, append(args, src)...)
			if !strings.Contains(out, "Imported permall") || !strings.Contains(out, dest) {
				t.Errorf("vtpm state import printed %q", out)
			}

			after := snapshot(t, src)
			if tc.toDest {
				if !maps.EqualFunc(before, after, bytes.Equal) {
					t.Errorf("import with --dest changed the source: before %v, after %v", slices.Sorted(maps.Keys(before)), slices.Sorted(maps.Keys(after)))
				}
			} else {
				if got := swtpmFiles(after); len(got) != 0 {
					t.Errorf("swtpm files still in place after the import: %v", slices.Sorted(maps.Keys(got)))
				}
				backups, _ := filepath.Glob(filepath.Join(src, "swtpm-backup-*"))
				if len(backups) != 1 {
					t.Fatalf("want one swtpm-backup-* directory, got %v", backups)
				}
				kept := snapshot(t, backups[0])
				if !maps.EqualFunc(kept, originals, bytes.Equal) {
					t.Errorf("backup %s holds %v; want exactly the original files %v, byte for byte", backups[0], slices.Sorted(maps.Keys(kept)), slices.Sorted(maps.Keys(originals)))
				}
			}
			if _, err := os.Stat(filepath.Join(dest, "vtpm-state.json")); err != nil {
				t.Fatalf("no sealed state in %s: %v", dest, err)
			}

			vt := startTPM(t, vtpm, home, dest, serveArgs...)
			vt.ioctl(t, "-i")
			if tc.volatile {
				// Resumed from the imported volatile state: no
				// TPM2_Startup, and the PCR keeps its value.
				if got, want := vt.readPCR(t), extendedPCR(); got != want {
					t.Errorf("PCR %s after import: %s, want %s", pcr, got, want)
				}
			} else {
				vt.tpm2(t, "tpm2_startup", "-c")
			}
			if got := vt.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("tpm2_nvread on the imported TPM: %q, want %q", got, nv)
			}
			vt.shutdown(t)
			if got := swtpmFiles(snapshot(t, dest)); len(got) != 0 {
				t.Errorf("serving the imported state wrote swtpm files %v: vtpm did not use the sealed state", slices.Sorted(maps.Keys(got)))
			}

			if tc.dataKey {
				// The sealed state is under --data-key, not the host key.
				sock := filepath.Join(shortDir(t), "tpm")
				out, err := testutil.RunErr([]string{"VTPM_HOME=" + home}, vtpm, "swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dest,
					"--server", "type=unixio,path="+sock, "--ctrl", "type=unixio,path="+sock+".ctrl")
				if err == nil || !strings.Contains(out, "no key protector") {
					t.Errorf("vtpm with the host key instead of --data-key: %v, %q; want it to refuse the state", err, out)
				}
			}
		})
	}
}

// TestStateImportRefuses checks that import refuses, says why, and leaves
// the directory exactly as it was.
func TestStateImportRefuses(t *testing.T) {
	t.Parallel()
	needStateTools(t)
	vtpm := testutil.Binary(t)
	tests := []struct {
		name    string
		setup   func(t *testing.T, dir string) (args []string, cleanup func())
		wantErr []string
	}{
		{
			name: "wrong key",
			setup: func(t *testing.T, dir string) ([]string, func()) {
				makeEncrypted(t, dir)
				wrong := filepath.Join(shortDir(t), "wrong")
				os.WriteFile(wrong, []byte("not the secret\n"), 0o600)
				return []string{"--key", "pwdfile=" + wrong + ",mode=aes-256-cbc"}, nil
			},
			wantErr: []string{"tpm2-00.permall: decrypt failed: wrong --key?"},
		},
		{
			name: "key missing",
			setup: func(t *testing.T, dir string) ([]string, func()) {
				makeEncrypted(t, dir)
				return nil, nil
			},
			wantErr: []string{"tpm2-00.permall is encrypted: give the --key"},
		},
		{
			name: "key for plain state",
			setup: func(t *testing.T, dir string) ([]string, func()) {
				makeSwtpmState(t, dir, []byte("x"), false)
				k := filepath.Join(shortDir(t), "k")
				os.WriteFile(k, []byte("secret"), 0o600)
				return []string{"--key", "pwdfile=" + k}, nil
			},
			wantErr: []string{"tpm2-00.permall is not encrypted, but --key was given"},
		},
		{
			name:    "no state",
			setup:   func(t *testing.T, dir string) ([]string, func()) { return nil, nil },
			wantErr: []string{"holds no swtpm TPM 2 state", "nothing to import"},
		},
		{
			name: "destination already sealed",
			setup: func(t *testing.T, dir string) ([]string, func()) {
				makeSwtpmState(t, dir, []byte("x"), false)
				dest := shortDir(t)
				makeSwtpmState(t, dest, []byte("y"), false)
				testutil.Run(t, []string{"VTPM_HOME=" + filepath.Join(dir, "..", "home")}, vtpm, "state", "import", dest)
				return []string{"--dest", dest}, nil
			},
			wantErr: []string{"already holds vtpm sealed state", "never overwrites"},
		},
		{
			name: "swtpm still running",
			setup: func(t *testing.T, dir string) ([]string, func()) {
				makeSwtpmState(t, dir, []byte("x"), false)
				sw := startTPM(t, "swtpm", "", dir)
				sw.ioctl(t, "-i") // takes the state directory's lock
				return nil, func() { sw.shutdown(t) }
			},
			wantErr: []string{"another TPM process is using this state directory"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			work := shortDir(t)
			dir := filepath.Join(work, "tpm2")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			args, cleanup := tc.setup(t, dir)
			before := snapshot(t, dir)
			out, err := testutil.RunErr([]string{"VTPM_HOME=" + filepath.Join(work, "home")}, vtpm, append(append([]string{"state", "import"}, args...), dir)...)
			if err == nil {
				t.Fatalf("vtpm state import succeeded: %s", out)
			}
			for _, want := range tc.wantErr {
				if !strings.Contains(out, want) {
					t.Errorf("error %q does not say %q", out, want)
				}
			}
			if after := snapshot(t, dir); !maps.EqualFunc(before, after, bytes.Equal) {
				t.Errorf("a refused import changed %s: before %v, after %v", dir, slices.Sorted(maps.Keys(before)), slices.Sorted(maps.Keys(after)))
			}
			if cleanup != nil {
				cleanup()
			}
		})
	}
}

func makeEncrypted(t *testing.T, dir string) {
	t.Helper()
	pwd := filepath.Join(shortDir(t), "secret")
	if err := os.WriteFile(pwd, []byte("the secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	makeSwtpmState(t, dir, []byte("x"), false, "--key", "pwdfile="+pwd+",mode=aes-256-cbc")
}
