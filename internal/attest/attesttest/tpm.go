package attesttest

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/keystore"
	"vtpm/internal/testutil"
)

// HostTPM is a swtpm process standing in for a host's hardware TPM, booted.
type HostTPM struct {
	// Spec names the TPM as VTPM_HOST_TPM does ("tcp:127.0.0.1:PORT").
	Spec string
	// EventLog is the path of its measured-boot event log.
	EventLog string
	Boot     Boot
	Proc     *testutil.Proc
}

// Start starts a factory-fresh swtpm (its own endorsement seed, so its own
// EK), extends PCRs 0–7 with boot's events and writes the matching event log
// into a temporary directory. It is stopped at the test's cleanup.
func Start(t testing.TB, boot Boot) *HostTPM {
	t.Helper()
	testutil.Need(t, "swtpm")
	port := testutil.FreePorts(t, 2)
	// Not t.TempDir: a test's name may hold a comma, which ends a swtpm
	// option.
	dir, err := os.MkdirTemp("", "attesttest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	h := &HostTPM{Spec: "tcp:" + addr, EventLog: filepath.Join(dir, "binary_bios_measurements"), Boot: boot}
	h.Proc = testutil.Start(t, "swtpm", nil, addr,
		"--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
		"--flags", "not-need-init,startup-clear",
		"--tpmstate", "dir="+state)
	if err := Extend(h.Spec, boot.Events()); err != nil {
		t.Fatalf("boot the host TPM stand-in: %v", err)
	}
	if err := os.WriteFile(h.EventLog, boot.Log(), 0o644); err != nil {
		t.Fatal(err)
	}
	return h
}

// Extend extends each event's digest into its PCR's SHA-256 bank of the TPM
// named by spec, as firmware does while it boots.
func Extend(spec string, events []Event) error {
	tpm, err := keystore.OpenHostTPM(spec)
	if err != nil {
		return err
	}
	defer tpm.Close()
	for _, e := range events {
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(e.PCR), Auth: tpm2.PasswordAuth(nil)},
			Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
				HashAlg: tpm2.TPMAlgSHA256, Digest: e.Digest[:],
			}}},
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("extend PCR %d: %w", e.PCR, err)
		}
	}
	return nil
}
