package manufacture

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/state"
	"vtpm/internal/swtpm"
)

// setupBroker opens a host keystore under a temporary data root on demand,
// and counts how often it was asked to.
func setupBroker(t *testing.T) (OpenBroker, *int) {
	root := t.TempDir()
	opened := new(int)
	return func() (*keybroker.Broker, error) {
		*opened++
		return keybroker.Open(root, keystore.Options{HostTPM: "none"})
	}, opened
}

func parseSetup(t *testing.T, args ...string) *swtpm.SetupOptions {
	t.Helper()
	o, err := swtpm.ParseSetup(args)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func TestSetupRefuses(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		args    []string
		kind    error
		wantErr string
	}{
		{"no state", []string{"--tpm2", "--createek"}, errdefs.ErrInvalidArgument, "--tpm-state must be provided"},
		{"TPM 1.2", []string{"--tpm-state", dir, "--createek"}, errdefs.ErrInvalidArgument, "pass --tpm2"},
		{"missing directory", []string{"--tpm2", "--tpm-state", filepath.Join(dir, "nope")}, errdefs.ErrNotFound, "cannot access directory"},
		{"reconfigure with EK", []string{"--tpm2", "--tpm-state", dir, "--reconfigure", "--createek"}, errdefs.ErrInvalidArgument, "Reconfiguration is not supported with creation of EK or certificates"},
		{"RSA 1024", []string{"--tpm2", "--tpm-state", dir, "--rsa-keysize", "1024"}, errdefs.ErrInvalidArgument, "Unsupported RSA key size 1024."},
		{"cipher", []string{"--tpm2", "--tpm-state", dir, "--cipher", "des"}, errdefs.ErrInvalidArgument, "Unsupported cipher des."},
		{"curve", []string{"--tpm2", "--tpm-state", dir, "--ecc-curve", "none"}, errdefs.ErrInvalidArgument, "Unsupported ECC curve none"},
		{"two keys", []string{"--tpm2", "--tpm-state", dir, "--keyfile", "a", "--pwdfile", "b"}, errdefs.ErrInvalidArgument, "Only one of"},
		{"file backend", []string{"--tpm2", "--tpm-state", "file:///tmp/x"}, errdefs.ErrInvalidArgument, "not supported"},
		{"reconfigure nothing", []string{"--tpm2", "--tpm-state", dir, "--reconfigure", "--pcr-banks", "sha1"}, errdefs.ErrNotFound, "no TPM state"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			open, opened := setupBroker(t)
			res, err := Setup(parseSetup(t, tc.args...), open, nil)
			if !errors.Is(err, tc.kind) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Setup: %v; want %v containing %q", err, tc.kind, tc.wantErr)
			}
			if !res.Started.IsZero() || res.Kept || *opened != 0 {
				t.Errorf("refused request: started %v, kept %v, keystore opened %d times; want none", res.Started, res.Kept, *opened)
			}
			if state.HasState(dir) {
				t.Fatal("a refused setup left TPM state behind")
			}
		})
	}
}

func TestSetupNoPCRBanks(t *testing.T) {
	dir := t.TempDir()
	open, _ := setupBroker(t)
	res, err := Setup(parseSetup(t, "--tpm2", "--tpm-state", dir, "--pcr-banks", "md5,foo"), open, nil)
	if err == nil || !strings.Contains(err.Error(), "No PCR banks could be allocated") || !res.Failed || res.Started.IsZero() {
		t.Errorf("Setup: %v, %+v; want a failure after starting", err, res)
	}
	if state.HasState(dir) {
		t.Fatal("a failed setup left TPM state behind")
	}
}

func TestSetupOverwrite(t *testing.T) {
	dir := t.TempDir()
	open, _ := setupBroker(t)
	certs := t.TempDir()
	res, err := Setup(parseSetup(t, "--tpm2", "--tpm-state", "dir://"+dir, "--create-ek-cert", "--lock-nvram", "--write-ek-cert-files", certs), open, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Report == nil || len(res.Report.EKs) != 2 || res.Report.EKs[0].Cert == nil || !slices.Equal(res.Banks, []string{"sha256"}) || res.Ended.Before(res.Started) {
		t.Fatalf("Setup: %+v; want RSA and ECC EKs with certificates, sha256", res)
	}
	for _, f := range []string{"ek-rsa2048.crt", "ek-secp256r1.crt"} {
		if b, err := os.ReadFile(filepath.Join(certs, f)); err != nil || len(b) == 0 {
			t.Errorf("--write-ek-cert-files: %s: %v", f, err)
		}
	}
	before := snapshot(t, dir)
	if res, err := Setup(parseSetup(t, "--tpm2", "--tpm-state", dir, "--not-overwrite"), open, nil); err != nil || !res.Kept {
		t.Errorf("--not-overwrite: %v, kept %v; want the state kept", err, res.Kept)
	}
	if _, err := Setup(parseSetup(t, "--tpm2", "--tpm-state", dir), open, nil); !errors.Is(err, errdefs.ErrAlreadyExists) || err.Error() != "Found existing TPM state 'permall'." {
		t.Errorf("existing state without overwrite flags: %v", err)
	}
	if !maps.Equal(snapshot(t, dir), before) {
		t.Fatal("a kept or refused setup changed the state directory")
	}
	res, err = Setup(parseSetup(t, "--tpm2", "--tpm-state", dir, "--createek", "--overwrite", "--pcr-banks", "-"), open, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Banks != nil || len(res.Report.PCRBanks) != 4 || res.Report.EKs[0].Cert != nil {
		t.Errorf("--overwrite --pcr-banks -: banks asked %v, active %v; want all four kept and no certificates", res.Banks, res.Report.PCRBanks)
	}
}

// TestShowWithoutState: an empty directory is refused with the way to make
// a TPM there, and the keystore is left alone.
func TestShowWithoutState(t *testing.T) {
	dir := t.TempDir()
	open, opened := setupBroker(t)
	_, err := Show(open, dir, "", nil)
	want := errdefs.Do(errdefs.ActionTPMManufacture, "dir", dir)
	if !errors.Is(err, errdefs.ErrNotFound) || !slices.ContainsFunc(errdefs.Remedies(err), func(r errdefs.Remedy) bool {
		return r.Action == want.Action && maps.Equal(r.Args, want.Args)
	}) {
		t.Errorf("Show of an empty directory: %v, remedies %+v; want not found with %s %v", err, errdefs.Remedies(err), want.Action, want.Args)
	}
	if *opened != 0 {
		t.Errorf("Show of an empty directory opened the keystore %d times", *opened)
	}
}

func TestMakeAndShow(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tpm")
	open, _ := setupBroker(t)
	o := Options{RSA: true, ECC: P256, EKCerts: true, PlatformCert: true, Lock: true, PCRBanks: []string{"sha256"}}
	made, err := Make(open, dir, false, o, nil)
	if err != nil {
		t.Fatal(err)
	}
	m := made.Summary()
	if m.Format != state.Sealed || len(m.EKs) != 2 || m.EKs[0].Certificate == nil || m.EKs[0].Certificate.TPM != made.TPM.String() || !m.PlatformCert {
		t.Errorf("Made: %+v; want sealed, two EKs with certificates naming the TPM, a platform certificate", m)
	}
	if _, err := Make(open, dir, false, o, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Make over a TPM without overwrite: %v; want already exists", err)
	}
	s, err := Show(open, dir, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.TPM != made.TPM.String() || s.Generation == nil || s.Format != state.Sealed || len(s.EKs) != 2 || !s.EKs[0].Certificate.Locked ||
		s.PlatformCert == nil || len(s.Protector) != 1 || !s.Protector[0].Owner || s.EKs[0].Fingerprint != m.EKs[0].Fingerprint {
		t.Errorf("Show: %+v; want the TPM just made, its generation, locked certificates and its owner", s)
	}
	var made1, shown strings.Builder
	made.WriteText(&made1, dir)
	s.WriteText(&shown)
	for _, want := range []string{"manufactured TPM " + made.TPM.String() + " in " + dir + " (sealed state)\n", "certificate in NV 0x1c00002", "  platform certificate in NV 0x1c08000\n", "  PCR banks: sha256\n"} {
		if !strings.Contains(made1.String(), want) {
			t.Errorf("made text lacks %q:\n%s", want, made1.String())
		}
	}
	for _, want := range []string{fmt.Sprintf("TPM %s in %s (sealed state, generation %d)\n", s.TPM, dir, *s.Generation), ", write-locked\n", "platform certificate:\n", "  (owner)\n"} {
		if !strings.Contains(shown.String(), want) {
			t.Errorf("shown text lacks %q:\n%s", want, shown.String())
		}
	}
	again, err := Make(open, dir, true, Options{RSA: true}, nil)
	if err != nil || again.TPM == made.TPM {
		t.Errorf("Make with overwrite: %v; want a new TPM", err)
	}
}
