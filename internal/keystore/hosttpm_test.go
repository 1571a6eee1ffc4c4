package keystore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/errdefs"
	"vtpm/internal/testutil"
)

// hostTPM is a swtpm process standing in for the host's hardware TPM.
type hostTPM struct {
	t     *testing.T
	port  int
	state string
	proc  *testutil.Proc
}

func startHostTPM(t *testing.T) *hostTPM {
	t.Helper()
	testutil.Need(t, "swtpm")
	h := &hostTPM{t: t, port: testutil.FreePorts(t, 2), state: t.TempDir()}
	h.start()
	return h
}

func (h *hostTPM) spec() string { return "tcp:" + h.addr() }
func (h *hostTPM) addr() string { return "127.0.0.1:" + strconv.Itoa(h.port) }

func (h *hostTPM) start() {
	h.t.Helper()
	h.proc = testutil.Start(h.t, "swtpm", nil, h.addr(),
		"--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d", h.port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d", h.port+1),
		"--flags", "not-need-init,startup-clear",
		"--tpmstate", "dir="+h.state)
}

func (h *hostTPM) stop() { h.proc.Kill() }

// replace stops the TPM and starts a factory-fresh one (new seeds) on the
// same ports, as if the host TPM had been cleared or swapped.
func (h *hostTPM) replace() {
	h.t.Helper()
	h.stop()
	if err := os.RemoveAll(h.state); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Mkdir(h.state, 0o700); err != nil {
		h.t.Fatal(err)
	}
	h.start()
}

// persistSRK makes the SRK persistent at 0x81000001, as provisioned hosts have it.
func (h *hostTPM) persistSRK() {
	h.t.Helper()
	tpm, err := openHostTPM(h.spec())
	if err != nil {
		h.t.Fatal(err)
	}
	defer tpm.Close()
	s, err := loadSRK(tpm, nil)
	if err != nil {
		h.t.Fatal(err)
	}
	defer s.flush(tpm)
	_, err = tpm2.EvictControl{
		Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		ObjectHandle:     tpm2.NamedHandle{Handle: s.handle, Name: s.name},
		PersistentHandle: persistentSRK,
	}.Execute(tpm)
	if err != nil {
		h.t.Fatalf("EvictControl: %v", err)
	}
}

func TestTPMSealed(t *testing.T) {
	h := startHostTPM(t)
	dir := filepath.Join(t.TempDir(), "ks")

	k, err := Open(dir, quietOpts(h.spec()))
	if err != nil {
		t.Fatalf("Open with host TPM %s: %v", h.spec(), err)
	}
	if p := k.Protection(); p.Kind != "tpm" || !strings.Contains(p.Detail, h.spec()) {
		t.Errorf("Protection() = %+v, want kind tpm naming %s", p, h.spec())
	}
	if err := k.Put("guardian", "local", []byte("guardian private key")); err != nil {
		t.Fatal(err)
	}
	k.Close()
	if _, err := os.Stat(filepath.Join(dir, masterFile)); err == nil {
		t.Error("a TPM-sealed keystore also has a plain master.key")
	}
	if m := mode(t, filepath.Join(dir, masterTPMFile)); m != 0o600 {
		t.Errorf("master.tpm mode %04o, want 0600", m)
	}

	// Reopen: explicitly, and with "" (auto), which uses the TPM it was sealed through.
	for _, spec := range []string{h.spec(), ""} {
		k, err := Open(dir, quietOpts(spec))
		if err != nil {
			t.Fatalf("reopen with HostTPM %q: %v", spec, err)
		}
		got, err := k.Get("guardian", "local")
		if err != nil || string(got) != "guardian private key" {
			t.Errorf("Get after reopen with HostTPM %q = %q, %v", spec, got, err)
		}
		if k.Protection().Kind != "tpm" {
			t.Errorf("reopen: Protection().Kind = %q", k.Protection().Kind)
		}
		k.Close()
	}

	// "none" cannot open a TPM-sealed keystore.
	if _, err := Open(dir, quietOpts("none")); !errors.Is(err, ErrHostTPMMissing) {
		t.Errorf("Open with HostTPM none: %v, want ErrHostTPMMissing", err)
	}

	// A provisioned persistent SRK with the same name is used instead of CreatePrimary.
	h.persistSRK()
	k, err = Open(dir, quietOpts(""))
	if err != nil {
		t.Fatalf("reopen with a persistent SRK: %v", err)
	}
	if !strings.Contains(k.Protection().Detail, "persistent SRK") {
		t.Errorf("Protection().Detail = %q, want it to use the persistent SRK", k.Protection().Detail)
	}
	k.Close()

	// The host TPM is cleared or replaced: new seeds, so a new SRK.
	h.replace()
	_, err = Open(dir, quietOpts(""))
	if !errors.Is(err, ErrHostTPMChanged) {
		t.Fatalf("Open after the host TPM was replaced: %v, want ErrHostTPMChanged", err)
	}
	for _, want := range []string{"sealed to a different TPM", "cleared or replaced", "restore the host TPM's state", "mv " + dir + " " + dir + ".old", masterTPMFile} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if !hasRemedy(err, errdefs.Do(errdefs.ActionGuardianImport)) {
		t.Errorf("error %q: ways out %+v, want importing the guardians' exports", err, errdefs.Remedies(err))
	}

	// No TPM at all.
	h.stop()
	_, err = Open(dir, quietOpts(""))
	if !errors.Is(err, ErrHostTPMMissing) {
		t.Fatalf("Open with no TPM listening: %v, want ErrHostTPMMissing", err)
	}
	if !strings.Contains(err.Error(), h.addr()) || !strings.Contains(err.Error(), "VTPM_HOST_TPM") {
		t.Errorf("error %q should name the TPM address and the setting to fix", err)
	}
}

// TestTPMChangedAtLoad covers a sealed object that passes the SRK name
// check but was made under another TPM's SRK: TPM2_Load fails its
// integrity check, which must read as ErrHostTPMChanged too.
func TestTPMChangedAtLoad(t *testing.T) {
	h := startHostTPM(t)
	dir := filepath.Join(t.TempDir(), "ks")
	k, err := Open(dir, quietOpts(h.spec()))
	if err != nil {
		t.Fatal(err)
	}
	k.Close()

	// Seal under a second TPM, then splice the first TPM's SRK name into
	// its record: the name check passes, Load does not.
	h2 := startHostTPM(t)
	dir2 := filepath.Join(t.TempDir(), "ks2")
	k2, err := Open(dir2, quietOpts(h2.spec()))
	if err != nil {
		t.Fatal(err)
	}
	k2.Close()
	m1, _ := os.ReadFile(filepath.Join(dir, masterTPMFile))
	m2, _ := os.ReadFile(filepath.Join(dir2, masterTPMFile))
	name := func(b []byte) string {
		i := strings.Index(string(b), `"srk_name"`)
		j := strings.Index(string(b[i:]), ",")
		return string(b[i : i+j])
	}
	spliced := strings.Replace(string(m2), name(m2), name(m1), 1)
	spliced = strings.Replace(spliced, h2.spec(), h.spec(), 1)
	if err := os.WriteFile(filepath.Join(dir2, masterTPMFile), []byte(spliced), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Open(dir2, quietOpts(""))
	if !errors.Is(err, ErrHostTPMChanged) {
		t.Fatalf("Open of an object sealed to another TPM: %v, want ErrHostTPMChanged", err)
	}
	if !strings.Contains(err.Error(), "integrity check") || !errors.Is(err, tpm2.TPMRCIntegrity) {
		t.Errorf("error %q should come from TPM2_Load's integrity check", err)
	}
}

func TestHostTPMSelection(t *testing.T) {
	free := testutil.FreePorts(t, 1)
	tests := []struct {
		name     string
		spec     string
		want     error  // nil: opens
		wantKind string // when it opens
	}{
		{"explicit tcp, nothing listening", fmt.Sprintf("tcp:127.0.0.1:%d", free), ErrHostTPMMissing, ""},
		{"explicit device missing", "device:/nonexistent/tpmrm0", ErrHostTPMMissing, ""},
		{"malformed", "usb:1", errBadSpec, ""},
		{"none", "none", nil, "file"},
	}
	if _, err := os.Stat("/dev/tpmrm0"); err != nil {
		// Without a host TPM, auto falls back to a file, with a reason.
		tests = append(tests, struct {
			name     string
			spec     string
			want     error
			wantKind string
		}{"auto without a TPM", "", nil, "file"})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ks")
			k, err := Open(dir, quietOpts(tt.spec))
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("Open(HostTPM %q): %v, want %v", tt.spec, err, tt.want)
				}
				// An explicit TPM that fails never degrades to a file.
				ents, _ := os.ReadDir(dir)
				for _, e := range ents {
					if strings.HasPrefix(e.Name(), "master") {
						t.Errorf("failed Open left %s behind", e.Name())
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("Open(HostTPM %q): %v", tt.spec, err)
			}
			defer k.Close()
			if k.Protection().Kind != tt.wantKind {
				t.Errorf("Protection() = %+v, want kind %s", k.Protection(), tt.wantKind)
			}
		})
	}
}

// TestOpenCost measures what opening the keystore adds to an instance's
// start. It logs medians; it asserts nothing about time.
func TestOpenCost(t *testing.T) {
	h := startHostTPM(t)
	fileDir := filepath.Join(t.TempDir(), "file")
	tpmDir := filepath.Join(t.TempDir(), "tpm")
	for _, c := range []struct{ dir, spec string }{{fileDir, "none"}, {tpmDir, h.spec()}} {
		k, err := Open(c.dir, quietOpts(c.spec))
		if err != nil {
			t.Fatal(err)
		}
		k.Close()
	}
	median := func(dir string) time.Duration {
		var ds []time.Duration
		for range 21 {
			start := time.Now()
			k, err := Open(dir, quietOpts(""))
			ds = append(ds, time.Since(start))
			if err != nil {
				t.Fatal(err)
			}
			k.Close()
		}
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	t.Logf("Open, median of 21: file %v; swtpm-sealed, SRK recreated %v", median(fileDir), median(tpmDir))
	h.persistSRK()
	t.Logf("Open, median of 21: swtpm-sealed, persistent SRK %v", median(tpmDir))
}

func BenchmarkOpen(b *testing.B) {
	testutil.Need(b, "swtpm")
	port := testutil.FreePorts(b, 2)
	state := b.TempDir()
	testutil.Start(b, "swtpm", nil, fmt.Sprintf("127.0.0.1:%d", port), "--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d", port), "--ctrl", fmt.Sprintf("type=tcp,port=%d", port+1),
		"--flags", "not-need-init,startup-clear", "--tpmstate", "dir="+state)
	for _, c := range []struct{ name, spec string }{{"file", "none"}, {"swtpm", fmt.Sprintf("tcp:127.0.0.1:%d", port)}} {
		dir := filepath.Join(b.TempDir(), c.name)
		k, err := Open(dir, quietOpts(c.spec))
		if err != nil {
			b.Fatal(err)
		}
		k.Close()
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				k, err := Open(dir, quietOpts(""))
				if err != nil {
					b.Fatal(err)
				}
				k.Close()
			}
		})
	}
}

func TestSealSecretToHostTPM(t *testing.T) {
	h := startHostTPM(t)
	secret := []byte("0123456789abcdef0123456789abcdef")
	sealed, err := SealToHostTPM(h.spec(), secret)
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnsealFromHostTPM("", sealed)
	if err != nil || string(got) != string(secret) {
		t.Fatalf("UnsealFromHostTPM = %q, %v", got, err)
	}
	h.replace()
	if _, err := UnsealFromHostTPM(h.spec(), sealed); !errors.Is(err, ErrHostTPMChanged) {
		t.Errorf("unseal on a replaced TPM: %v, want ErrHostTPMChanged", err)
	}
}
