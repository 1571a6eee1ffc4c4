package main

import (
	"bytes"
	"crypto/sha256"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"vtpm/internal/keybroker"
	"vtpm/internal/manufacture"
	"vtpm/internal/seal"
	"vtpm/internal/state"
	"vtpm/internal/swtpm/statefile"
)

// setupEnv gives a test its own data root and returns a fresh state directory.
func setupEnv(t *testing.T) string {
	t.Helper()
	t.Setenv("VTPM_HOME", filepath.Join(t.TempDir(), "home"))
	t.Setenv("VTPM_HOST_TPM", "none")
	dir := filepath.Join(t.TempDir(), "tpm2")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

func setup(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = runSwtpmSetup(args, &out, &errb)
	return code, out.String(), errb.String()
}

// libvirtArgs is what libvirt 9 passes to create a vTPM.
func libvirtArgs(dir, log string) []string {
	return []string{"--tpm2", "--tpm-state", dir, "--vmid", "vm1:9c6a2f0e-5a43-4a1e-8f0e-0d7e4e3e6a11",
		"--logfile", log, "--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"}
}

func dirHashes(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	m := map[string][32]byte{}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = sha256.Sum256(b)
	}
	return m
}

// inspect reads the TPM in dir the way vtpm tpm show does.
func inspect(t *testing.T, dir, key string) *manufacture.Info {
	t.Helper()
	var info *manufacture.Info
	err := withHost(func(h *keybroker.Broker) error {
		st, err := manufacture.Open(h, dir, key, warnLogger())
		if err != nil {
			return err
		}
		defer st.Storage.Close()
		info, err = manufacture.Inspect(st.Storage)
		return err
	})
	if err != nil {
		t.Fatalf("inspect %s: %v", dir, err)
	}
	return info
}

func TestSwtpmSetupBadOptions(t *testing.T) {
	dir := setupEnv(t)
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"unknown option", []string{"--tpm2", "--foo"}, "swtpm_setup: unrecognized option '--foo'"},
		{"missing argument", []string{"--tpm2", "--tpm-state", dir, "--vmid"}, "option '--vmid' requires an argument"},
		{"flag with argument", []string{"--tpm2=yes", "--tpm-state", dir}, "doesn't allow an argument"},
		{"no state", []string{"--tpm2", "--createek"}, "--tpm-state must be provided"},
		{"TPM 1.2", []string{"--tpm-state", dir, "--createek"}, "pass --tpm2"},
		{"missing directory", []string{"--tpm2", "--tpm-state", filepath.Join(dir, "nope")}, "cannot access directory"},
		{"reconfigure with EK", []string{"--tpm2", "--tpm-state", dir, "--reconfigure", "--createek"}, "Reconfiguration is not supported with creation of EK or certificates"},
		{"RSA 1024", []string{"--tpm2", "--tpm-state", dir, "--rsa-keysize", "1024"}, "Unsupported RSA key size 1024."},
		{"RSA 3072", []string{"--tpm2", "--tpm-state", dir, "--rsa-keysize", "3072"}, "Unsupported RSA key size 3072."},
		{"cipher", []string{"--tpm2", "--tpm-state", dir, "--cipher", "des"}, "Unsupported cipher des."},
		{"two keys", []string{"--tpm2", "--tpm-state", dir, "--keyfile", "a", "--pwdfile", "b"}, "Only one of"},
		{"file backend", []string{"--tpm2", "--tpm-state", "file:///tmp/x"}, "not supported"},
		{"no known PCR bank", []string{"--tpm2", "--tpm-state", dir, "--pcr-banks", "md5,foo"}, "No PCR banks could be allocated"},
		{"reconfigure nothing", []string{"--tpm2", "--tpm-state", dir, "--reconfigure", "--pcr-banks", "sha1"}, "no TPM state"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := setup(t, tc.args...)
			if code != 1 {
				t.Errorf("exit code %d, want 1", code)
			}
			if !strings.Contains(stderr, tc.wantErr) {
				t.Errorf("stderr %q, want it to contain %q", stderr, tc.wantErr)
			}
			if state.HasState(dir) {
				t.Fatal("a failed swtpm_setup left TPM state behind")
			}
		})
	}
}

func TestSwtpmSetupInformational(t *testing.T) {
	setupEnv(t)
	tests := []struct {
		args     []string
		want     string
		dontWant string
	}{
		{[]string{"--print-capabilities"}, `"type": "swtpm_setup"`, "tpm-1.2"},
		{[]string{"--version"}, "TPM emulator setup tool version 0.7.1", ""},
		{[]string{"--help"}, "--tpm-state", ""},
		{[]string{"--create-config-files", "skip-if-exist"}, "", "Usage"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, stdout, _ := setup(t, tc.args...)
			if code != 0 || !strings.Contains(stdout, tc.want) || (tc.dontWant != "" && strings.Contains(stdout, tc.dontWant)) {
				t.Errorf("exit %d, stdout %q; want 0 and %q without %q", code, stdout, tc.want, tc.dontWant)
			}
		})
	}
	_, caps, _ := setup(t, "--print-capabilities")
	for _, f := range []string{"tpm-2.0", "cmdarg-pwdfile-fd", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks", "tpm2-rsa-keysize-2048"} {
		if !strings.Contains(caps, `"`+f+`"`) {
			t.Errorf("--print-capabilities lacks %q, which libvirt looks for: %s", f, caps)
		}
	}
}

func TestSwtpmSetupLibvirt(t *testing.T) {
	dir := setupEnv(t)
	log := filepath.Join(t.TempDir(), "setup.log")
	if code, out, errs := setup(t, libvirtArgs(dir, log)...); code != 0 {
		b, _ := os.ReadFile(log)
		t.Fatalf("libvirt's swtpm_setup call: exit %d\n%s%s%s", code, out, errs, b)
	}
	b, _ := os.ReadFile(log)
	for _, want := range []string{"Successfully created RSA 2048 EK with handle 0x81010001.", "for platform certificate", "Successfully activated PCR banks sha256 among", "Successfully authored TPM state."} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("log lacks %q:\n%s", want, b)
		}
	}
	if !seal.HasBlobs(dir) {
		t.Fatal("no sealed state written")
	}
	info := inspect(t, dir, "")
	if len(info.EKs) != 2 || info.EKs[0].Cert == nil || info.EKs[1].Cert == nil || info.PlatformCert == nil {
		t.Fatalf("state holds %d EKs, certificates %v/%v, platform %v; want RSA and ECC EKs with certificates and a platform certificate",
			len(info.EKs), info.EKs[0].Cert != nil, len(info.EKs) > 1 && info.EKs[1].Cert != nil, info.PlatformCert != nil)
	}
	if !info.EKs[0].Locked || !slices.Equal(info.PCRBanks, []string{"sha256"}) {
		t.Errorf("locked %v, PCR banks %v; want locked, sha256", info.EKs[0].Locked, info.PCRBanks)
	}
	if got := info.EKs[0].Cert.Subject.CommonName; got != "vm1:9c6a2f0e-5a43-4a1e-8f0e-0d7e4e3e6a11" {
		t.Errorf("certificate subject CN %q, want the --vmid", got)
	}

	t.Run("not-overwrite changes nothing", func(t *testing.T) {
		before := dirHashes(t, dir)
		code, _, _ := setup(t, libvirtArgs(dir, log)...)
		if code != 0 {
			t.Fatalf("exit %d, want 0", code)
		}
		if after := dirHashes(t, dir); !maps.Equal(before, after) {
			t.Error("--not-overwrite changed the state directory")
		}
		if b, _ := os.ReadFile(log); !bytes.Contains(b, []byte("Not overwriting existing state file.")) {
			t.Error("log lacks 'Not overwriting existing state file.'")
		}
	})
	t.Run("existing state without overwrite flags", func(t *testing.T) {
		before := dirHashes(t, dir)
		code, _, stderr := setup(t, "--tpm2", "--tpm-state", dir, "--createek")
		if code != 1 || !strings.Contains(stderr, "Found existing TPM state") {
			t.Errorf("exit %d, stderr %q; want 1 and 'Found existing TPM state'", code, stderr)
		}
		if after := dirHashes(t, dir); !maps.Equal(before, after) {
			t.Error("a refused swtpm_setup changed the state directory")
		}
	})
	t.Run("reconfigure PCR banks keeps the EKs", func(t *testing.T) {
		code, out, errs := setup(t, "--tpm2", "--tpm-state", "dir://"+dir, "--pcr-banks", "sha1,sha256", "--reconfigure")
		if code != 0 {
			t.Fatalf("exit %d\n%s%s", code, out, errs)
		}
		again := inspect(t, dir, "")
		if !slices.Equal(again.PCRBanks, []string{"sha1", "sha256"}) {
			t.Errorf("PCR banks %v, want sha1,sha256", again.PCRBanks)
		}
		if !manufacture.PublicKeyEqual(again.EKs[0].Public, info.EKs[0].Public) {
			t.Error("--reconfigure changed the EK")
		}
	})
	t.Run("overwrite makes a new TPM", func(t *testing.T) {
		old, _ := seal.Identify(dir)
		code, out, errs := setup(t, "--tpm2", "--tpm-state", dir, "--createek", "--overwrite", "--pcr-banks", "-")
		if code != 0 {
			t.Fatalf("exit %d\n%s%s", code, out, errs)
		}
		if id, _ := seal.Identify(dir); id == old {
			t.Error("--overwrite kept the old TPM's identity")
		}
		again := inspect(t, dir, "")
		if manufacture.PublicKeyEqual(again.EKs[0].Public, info.EKs[0].Public) || again.EKs[0].Cert != nil {
			t.Error("--overwrite kept the old EK or its certificate")
		}
		if len(again.PCRBanks) != 4 {
			t.Errorf("--pcr-banks -: banks %v, want all four left active", again.PCRBanks)
		}
	})
}

func TestSwtpmSetupEncryptedSwtpmState(t *testing.T) {
	dir := setupEnv(t)
	pwd := filepath.Join(t.TempDir(), "pwd")
	os.WriteFile(pwd, []byte("correct horse"), 0o600)
	certs := t.TempDir()
	code, out, errs := setup(t, "--tpm2", "--tpm-state", dir, "--pwdfile", pwd, "--cipher", "aes-256-cbc",
		"--create-ek-cert", "--write-ek-cert-files", certs)
	if code != 0 {
		t.Fatalf("exit %d\n%s%s", code, out, errs)
	}
	if !statefile.HasState(dir) || seal.Exists(dir) {
		t.Fatal("with --pwdfile the state must be in swtpm's file format")
	}
	info := inspect(t, dir, "pwdfile="+pwd+",mode=aes-256-cbc")
	if len(info.EKs) != 2 || info.EKs[0].Cert == nil {
		t.Fatalf("encrypted state holds %d EKs; want RSA and ECC with certificates", len(info.EKs))
	}
	for _, f := range []string{"ek-rsa2048.crt", "ek-secp256r1.crt"} {
		if b, err := os.ReadFile(filepath.Join(certs, f)); err != nil || len(b) == 0 {
			t.Errorf("--write-ek-cert-files: %s: %v", f, err)
		}
	}
	if _, err := statefile.ParseKeyOption("pwdfile=" + pwd + ",mode=aes-128-cbc"); err != nil {
		t.Fatal(err)
	}
	// The wrong cipher does not open the state.
	err := withHost(func(h *keybroker.Broker) error {
		st, err := manufacture.Open(h, dir, "pwdfile="+pwd+",mode=aes-128-cbc", warnLogger())
		if err != nil {
			return err
		}
		defer st.Storage.Close()
		_, err = manufacture.Inspect(st.Storage)
		return err
	})
	if err == nil {
		t.Error("state encrypted with aes-256-cbc opened with aes-128-cbc")
	}
}
