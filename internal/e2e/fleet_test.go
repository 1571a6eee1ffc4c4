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

// fleet is a key service (one node, embedded etcd, on loopback) and a host,
// alpha, registered with it and attested, whose host service listens on
// sock.
type fleet struct {
	vtpm  string
	admin []string // the admin's bundle flag
	alpha []string // the environment of vtpm commands on alpha
	sock  string
	svc   *testutil.Proc // alpha's host service
	ks    *testutil.Proc // the key service's one node
}

// vtpmOK runs vtpm ARGS… with env added and fails the test on error.
func vtpmOK(ctx context.Context, t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(ctx, testutil.Binary(t), args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vtpm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func startFleet(ctx context.Context, t *testing.T, dir string) *fleet {
	t.Helper()
	f := &fleet{vtpm: testutil.Binary(t)}
	testutil.HostdBinary(t)
	testutil.KeyserviceBinary(t)
	ksDir, base := filepath.Join(dir, "ks"), testutil.FreePorts(t, 3)
	listen := fmt.Sprintf("127.0.0.1:%d", base)
	ks := testutil.StartCmd(t, exec.Command(f.vtpm, "keyservice", "serve", "--data-dir", ksDir, "--listen", listen,
		"--client-url", fmt.Sprintf("http://127.0.0.1:%d", base+1), "--peer-url", fmt.Sprintf("http://127.0.0.1:%d", base+2)), "")
	if err := ks.WaitReady(listen, time.Minute); err != nil {
		t.Fatalf("key service: %v\n%s", err, ks.Stderr)
	}
	f.ks = ks
	vtpmOK(ctx, t, nil, "keyservice", "init", "--data-dir", ksDir, "--server", "https://"+listen)
	f.admin = []string{"--bundle", filepath.Join(ksDir, "admin.json")}

	root := filepath.Join(dir, "alpha")
	f.sock = filepath.Join(dir, "alpha-run", "host.sock")
	f.alpha = []string{"VTPM_HOME=" + root, hostsvc.SocketEnv + "=" + f.sock, "VTPM_HOST_TPM=none"}
	certs := filepath.Join(dir, "alpha.pem")
	vtpmOK(ctx, t, f.alpha, "guardian", "export", "--certs-only", "-o", certs)
	vtpmOK(ctx, t, nil, append([]string{"keyservice", "host", "add", "alpha", "--guardian", certs, "-o", filepath.Join(root, keyrelease.BundleFile)}, f.admin...)...)
	cmd := exec.Command(f.vtpm, "host", "serve", "--name", "alpha")
	cmd.Env = append(os.Environ(), f.alpha...)
	f.svc = testutil.StartCmd(t, cmd, "")
	if err := f.svc.WaitReady(f.sock, 30*time.Second); err != nil {
		t.Fatalf("host service: %v\n%s", err, f.svc.Stderr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("alpha's host service:\n%s", f.svc.Stderr)
		}
	})
	for !strings.Contains(f.svc.Stderr.String(), "key service: attested") {
		select {
		case <-ctx.Done():
			t.Fatalf("alpha did not attest:\n%s", f.svc.Stderr)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return f
}

// grantFleet adds the fleet guardian's row to the protector of the TPM in
// state, on its owner (env).
func (f *fleet) grantFleet(ctx context.Context, t *testing.T, dir string, env []string, state string) {
	t.Helper()
	pem := filepath.Join(dir, "fleet.pem")
	if _, err := os.Stat(pem); err != nil {
		vtpmOK(ctx, t, nil, append([]string{"keyservice", "fleet-guardian", "-o", pem}, f.admin...)...)
	}
	vtpmOK(ctx, t, env, "protector", "grant", state, pem)
}

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
	dir := qemutest.ShortTempDir(t)
	f := startFleet(ctx, t, dir)

	// The owner seals a secret in its guest.
	owner, state, vars := []string{"VTPM_HOME=" + filepath.Join(dir, "owner")}, filepath.Join(dir, "tpm"), filepath.Join(dir, "vars.fd")
	tpm, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{Command: []string{f.vtpm, "swtpm"}, StateDir: state, Env: owner})
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
	f.grantFleet(ctx, t, dir, owner, state)

	// The TPM and the guest's variables move to alpha; the guest unseals.
	moved := filepath.Join(dir, "moved")
	copyDir(t, state, moved)
	tpm, err = qemutest.StartTPM(ctx, t, qemutest.TPMConfig{Command: []string{f.vtpm, "swtpm"}, StateDir: moved, Env: f.alpha})
	if err != nil {
		t.Fatal(err)
	}
	vm, err = qemutest.Start(ctx, t, qemutest.Config{TPMSocket: tpm.Socket, VarsFile: vars, Name: "alpha"})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := vm.Run(ctx, "tpmtest unseal 0x81000010"); err != nil || strings.TrimSpace(out) != "fleet-secret" {
		t.Fatalf("unseal on alpha: %q, %v", out, err)
	}
	mustContain(t, "alpha's host service log", f.svc.Stderr.String(), "key service: released a TPM's key")

	// The key service goes away: the running guest keeps its TPM, and a
	// new start of the same TPM fails, naming the node it tried.
	f.ks.Kill()
	if out, err := vm.Run(ctx, "tpmtest unseal 0x81000010"); err != nil || strings.TrimSpace(out) != "fleet-secret" {
		t.Fatalf("unseal on alpha with the key service down: %q, %v", out, err)
	}
	again := filepath.Join(dir, "again")
	copyDir(t, state, again)
	if _, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{Command: []string{f.vtpm, "swtpm"}, StateDir: again, Env: f.alpha}); err == nil {
		t.Fatal("a fleet-only TPM started on alpha with the key service down")
	} else {
		mustContain(t, "the refused start", err.Error(), "127.0.0.1")
	}
}

// TestLiveMigrationToFleetHost migrates a running guest into `swtpm socket
// --runas tss` on an empty directory of a host that holds no guardian of
// the TPM, as libvirt does: the host service adopts the TPM from the
// stream with the key the key service releases through the protector's
// fleet row. PCR 16 arrives.
func TestLiveMigrationToFleetHost(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	if os.Geteuid() != 0 {
		testutil.Missing(t, "--runas and the host service need root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := qemutest.ShortTempDir(t)
	// tss opens its state directory by path.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f := startFleet(ctx, t, dir)

	owner, srcState, dstState := []string{"VTPM_HOME=" + filepath.Join(dir, "owner")}, filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	vtpmOK(ctx, t, owner, "tpm", "manufacture", srcState)
	f.grantFleet(ctx, t, dir, owner, srcState)
	srcTPM, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{Command: []string{f.vtpm, "swtpm"}, StateDir: srcState, Env: owner})
	if err != nil {
		t.Fatal(err)
	}
	src, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: srcTPM.Socket, Name: "src"})
	if err != nil {
		t.Fatal(err)
	}
	digest := strings.Repeat("ef", 32)
	run(ctx, t, src, direct+"tpm2_pcrextend 16:sha256="+digest)

	if err := os.Mkdir(dstState, 0o700); err != nil {
		t.Fatal(err)
	}
	dstTPM, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{
		Command: []string{f.vtpm, "swtpm"}, StateDir: dstState, ExtraArgs: []string{"--runas", "tss"}, Env: f.alpha,
	})
	if err != nil {
		t.Fatal(err)
	}
	uri := "unix:" + filepath.Join(dir, "mig.sock")
	dst, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: dstTPM.Socket, Incoming: uri, Name: "dst"})
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range []*qemutest.VM{src, dst} {
		if _, err := vm.QMP(ctx, "migrate-set-capabilities", map[string]any{
			"capabilities": []map[string]any{{"capability": "return-path", "state": true}},
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.Migrate(ctx, uri); err != nil {
		b, _ := os.ReadFile(dstTPM.LogFile)
		t.Fatalf("migrate: %v\ndestination's log:\n%s", err, b)
	}
	if err := dst.WaitStatus(ctx, "running"); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(run(ctx, t, dst, "tpmtest pcr 16")); got != extendedZero(t, digest) {
		t.Errorf("PCR 16 after migration = %s, want %s", got, extendedZero(t, digest))
	}
	mustContain(t, "alpha's host service log", f.svc.Stderr.String(), "key service: released a TPM's key", "adopted a TPM from a migration stream")
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
