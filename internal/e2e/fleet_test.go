package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vtpm/internal/hostsvc"
	"vtpm/internal/keyrelease"
	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// TestGuestUnsealsOnFleetHost: a guest seals a secret to PCR 7 under a TPM
// whose owner is a host that is then gone; its protector admits the fleet
// guardian besides. On a host that holds no guardian of the TPM but is
// registered with the key service and attested, the vTPM gets the key
// from the key service through the host service, and the guest, booted
// again, unseals its secret.
func TestGuestUnsealsOnFleetHost(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	if os.Geteuid() != 0 {
		testutil.Missing(t, "the host service runs as root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	vtpm := testutil.Binary(t)
	testutil.HostdBinary(t)
	testutil.KeyserviceBinary(t)
	dir := qemutest.ShortTempDir(t)
	run := func(env []string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, vtpm, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("vtpm %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	// The key service: one node, embedded etcd, on loopback.
	ksDir, base := filepath.Join(dir, "ks"), testutil.FreePorts(t, 3)
	listen := fmt.Sprintf("127.0.0.1:%d", base)
	ks := testutil.StartCmd(t, exec.Command(vtpm, "keyservice", "serve", "--data-dir", ksDir, "--listen", listen,
		"--client-url", fmt.Sprintf("http://127.0.0.1:%d", base+1), "--peer-url", fmt.Sprintf("http://127.0.0.1:%d", base+2)), "")
	if err := ks.WaitReady(listen, time.Minute); err != nil {
		t.Fatalf("key service: %v\n%s", err, ks.Stderr)
	}
	run(nil, "keyservice", "init", "--data-dir", ksDir, "--server", "https://"+listen)
	admin := []string{"--bundle", filepath.Join(ksDir, "admin.json")}

	// The owner seals a secret in its guest.
	owner, state, vars := []string{"VTPM_HOME=" + filepath.Join(dir, "owner")}, filepath.Join(dir, "tpm"), filepath.Join(dir, "vars.fd")
	tpm, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{Command: []string{vtpm, "swtpm"}, StateDir: state, Env: owner})
	if err != nil {
		t.Fatal(err)
	}
	vm, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: tpm.Socket, VarsFile: vars, Name: "owner"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Run(ctx, "tpmtest seal 0x81000010 fleet-secret"); err != nil {
		t.Fatal(err)
	}
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := tpm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	fleetPEM := filepath.Join(dir, "fleet.pem")
	run(nil, append([]string{"keyservice", "fleet-guardian", "-o", fleetPEM}, admin...)...)
	run(owner, "protector", "grant", state, fleetPEM)

	// Host alpha: registered, its host service attested.
	root, sock := filepath.Join(dir, "alpha"), filepath.Join(dir, "alpha-run", "host.sock")
	alpha := []string{"VTPM_HOME=" + root, hostsvc.SocketEnv + "=" + sock, "VTPM_HOST_TPM=none"}
	certs := filepath.Join(dir, "alpha.pem")
	run(alpha, "guardian", "export", "--certs-only", "-o", certs)
	run(nil, append([]string{"keyservice", "host", "add", "alpha", "--guardian", certs, "-o", filepath.Join(root, keyrelease.BundleFile)}, admin...)...)
	hostCmd := exec.Command(vtpm, "host", "serve", "--name", "alpha")
	hostCmd.Env = append(os.Environ(), alpha...)
	svc := testutil.StartCmd(t, hostCmd, "")
	if err := svc.WaitReady(sock, 30*time.Second); err != nil {
		t.Fatalf("host service: %v\n%s", err, svc.Stderr)
	}
	for !strings.Contains(svc.Stderr.String(), "key service: attested") {
		select {
		case <-ctx.Done():
			t.Fatalf("alpha did not attest:\n%s", svc.Stderr)
		case <-time.After(50 * time.Millisecond):
		}
	}

	// The TPM and the guest's variables move to alpha; the guest unseals.
	moved := filepath.Join(dir, "moved")
	copyDir(t, state, moved)
	tpm, err = qemutest.StartTPM(ctx, t, qemutest.TPMConfig{Command: []string{vtpm, "swtpm"}, StateDir: moved, Env: alpha})
	if err != nil {
		t.Fatalf("%v\nhost service:\n%s", err, svc.Stderr)
	}
	vm, err = qemutest.Start(ctx, t, qemutest.Config{TPMSocket: tpm.Socket, VarsFile: vars, Name: "alpha"})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := vm.Run(ctx, "tpmtest unseal 0x81000010"); err != nil || strings.TrimSpace(out) != "fleet-secret" {
		t.Fatalf("unseal on alpha: %q, %v", out, err)
	}
	mustContain(t, "alpha's host service log", svc.Stderr.String(), "key service: released a TPM's key")
}

// copyDir copies the regular files of src into a new directory dst.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Type().IsRegular() {
			copyFile(t, e.Name(), src, dst)
		}
	}
}
