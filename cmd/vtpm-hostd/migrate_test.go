package main

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vtpm/internal/guardian"
	"vtpm/internal/migrate"
	"vtpm/internal/qemutest"
	"vtpm/internal/seal"
	"vtpm/internal/testutil"
	"vtpm/internal/vm"
)

// TestVMMigrate migrates a running VM between two host services through
// the CLI and the API: refused in pre-flight while the TPM's protector
// does not admit B, with a fix line offering --grant and B's guardian
// named; with --grant --json, progress lines and a result, the VM running
// and registered on B and gone from A.
func TestVMMigrate(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	run := qemutest.ShortTempDir(t)
	t.Setenv("XDG_RUNTIME_DIR", run)
	accel := "tcg"
	if qemutest.KVMAvailable() {
		accel = "kvm"
	}
	t.Setenv("VTPM_ACCEL", accel)
	img, err := qemutest.BuildImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, b := newHost(t, "a"), newHost(t, "b")
	// The vTPM user reaches B's bundles and run directories, as it does
	// under /var/lib/vtpm and /run/vtpm.
	searchable(t, run, b.dir)
	a.start(t)
	b.start(t)
	a.mustVTPM(t, "host", "trust", "b", b.addr, b.certs(t))
	b.mustVTPM(t, "host", "trust", "a", a.addr, a.certs(t))
	b.mustVTPM(t, "host", "allow-path", img.Kernel, img.Initrd)

	a.mustVTPM(t, "vm", "create", "mig", "--os", "linux", "--tpm", "--disk-size", "64M", "--memory", "256M", "--cpus", "1",
		"--kernel", img.Kernel, "--initrd", img.Initrd, "--append", "quiet rdinit=/init no_timer_check")
	// The protector also admits a guardian that is no host's, as a key
	// service's fleet guardian: the refusal offers that path too.
	fleet, err := guardian.New("fleet", guardian.MLKEM768X25519)
	if err != nil {
		t.Fatal(err)
	}
	fleetPEM, err := fleet.ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	fleetFile := filepath.Join(a.dir, "fleet.pem")
	if err := os.WriteFile(fleetFile, fleetPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	a.mustVTPM(t, "protector", "grant", "mig", fleetFile)
	sock := filepath.Join(run, "ser.sock")
	a.mustVTPM(t, "vm", "start", "mig", "--serial-socket", sock)
	t.Cleanup(func() {
		a.vtpm(t, "vm", "stop", "mig", "--timeout", "0")
		b.vtpm(t, "vm", "stop", "mig", "--timeout", "0")
	})
	bctx, bcancel := context.WithTimeout(ctx, 4*time.Minute)
	s, err := qemutest.DialSerial(bctx, sock)
	bcancel()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Run(ctx, "tpm2_pcrextend 16:sha256="+strings.Repeat("ab", 32)); err != nil {
		t.Fatal(err)
	}

	out, err := a.vtpm(t, "vm", "migrate", "mig", "--to", "b")
	if err == nil {
		t.Fatalf("migration to a host the protector does not admit succeeded:\n%s", out)
	}
	wantAll(t, "the refusal", out, "cannot migrate to b", "nothing was started", b.fingerprint(t), "fix:", "vtpm vm migrate mig --to b --grant")
	wantAll(t, "the key service path", out, "fleet (fingerprint "+fleet.Fingerprint()+")", "vtpm keyservice host add b", "attest")
	if _, err := s.Run(ctx, "tpmtest pcr 16"); err != nil {
		t.Fatalf("guest on A after the refusal: %v", err)
	}
	if vms := b.mustVTPM(t, "vm", "list", "-a"); strings.Contains(vms, "mig") {
		t.Errorf("B lists the refused VM:\n%s", vms)
	}

	cmd := exec.Command(testutil.Binary(t), "vm", "migrate", "mig", "--to", "b", "--grant", "--json")
	cmd.Env = append(os.Environ(), a.env()...)
	raw, err := cmd.Output()
	if err != nil {
		t.Fatalf("vm migrate --grant: %v\n%s", err, raw)
	}
	var phases []string
	var res *migrate.Result
	sc := bufio.NewScanner(strings.NewReader(string(raw)))
	for sc.Scan() {
		var line struct {
			Phase  string          `json:"phase"`
			Result *migrate.Result `json:"result"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("--json line %q: %v", sc.Text(), err)
		}
		if line.Result != nil {
			res = line.Result
		} else {
			phases = append(phases, line.Phase)
		}
	}
	if res == nil || res.Host != "b" || res.DiskBytes == 0 || res.Backup == "" || res.Granted == "" {
		t.Fatalf("result %+v; output:\n%s", res, raw)
	}
	if !strings.Contains(strings.Join(phases, " "), "memory") {
		t.Errorf("progress phases %v lack the memory transfer", phases)
	}
	t.Logf("migrated: %+v, phases %v", res, phases)
	if vms := a.mustVTPM(t, "vm", "list", "-a"); strings.Contains(vms, "mig") {
		t.Errorf("A still lists the migrated VM:\n%s", vms)
	}
	vms := b.mustVTPM(t, "vm", "list", "-a", "--json")
	if !strings.Contains(vms, `"name":"mig"`) && !strings.Contains(vms, `"name": "mig"`) || !strings.Contains(vms, "running") {
		t.Errorf("B's VMs after the migration:\n%s", vms)
	}
	assertAdoptedUnprivileged(t, b, "mig")
	// A keeps the TPM state as a backup until it is purged.
	if _, err := os.Stat(res.Backup); err != nil {
		t.Errorf("the TPM backup on A: %v", err)
	}
	out = a.mustVTPM(t, "vm", "delete", "mig", "--purge-backup", "--yes")
	wantAll(t, "vm delete --purge-backup", out, "removed the backup of VM mig's TPM state")
	if _, err := os.Stat(res.Backup); !os.IsNotExist(err) {
		t.Errorf("the TPM backup on A after --purge-backup: %v", err)
	}

	// Stopped, it goes back offline.
	b.mustVTPM(t, "vm", "stop", "mig", "--timeout", "0")
	out = b.mustVTPM(t, "vm", "migrate", "mig", "--to", "a")
	wantAll(t, "the offline migration", out, "not running: moving it offline")
	if vms := a.mustVTPM(t, "vm", "list", "-a"); !strings.Contains(vms, "mig") {
		t.Errorf("A does not list the VM moved back:\n%s", vms)
	}
}

// searchable lets every user search dirs and the directories above them,
// so that a vTPM that dropped to its user reaches what vm start gives it.
func searchable(t *testing.T, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		for ; d != "/" && d != "."; d = filepath.Dir(d) {
			st, err := os.Stat(d)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(d, st.Mode().Perm()|0o001); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// assertAdoptedUnprivileged checks that VM name's vTPM on h runs as the
// vTPM user (tss), not root, and that h records its TPM's generations.
func assertAdoptedUnprivileged(t *testing.T, h *host, name string) {
	t.Helper()
	var vms []vm.Summary
	if err := json.Unmarshal([]byte(h.mustVTPM(t, "vm", "list", "-a", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	pid := 0
	for _, v := range vms {
		if v.Name == name {
			pid = v.TPMPid
		}
	}
	if pid == 0 {
		t.Fatalf("%s lists no vTPM for %s: %+v", h.name, name, vms)
	}
	tss, err := user.Lookup("tss")
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(st), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[0] == "Uid:" && f[1] != tss.Uid {
			t.Errorf("the received VM's vTPM (pid %d) runs as uid %s, not the vTPM user tss (%s)", pid, f[1], tss.Uid)
		}
	}
	dir := filepath.Join(h.root, "vms", name)
	id, err := seal.Identify(filepath.Join(dir, "tpm"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(h.root, "keystore", "generations", id.String())); err != nil {
		t.Errorf("%s keeps no generation record for the adopted TPM %s: %v", h.name, id, err)
	}
	if log, _ := os.ReadFile(filepath.Join(dir, "logs", "tpm.log")); strings.Contains(string(log), "from its next start") {
		t.Errorf("the adopted TPM's generations wait for its next start:\n%s", log)
	}
}

// migrationHosts sets up hosts a and b trusting each other, and VM mig on a with
// a vTPM whose protector admits b, running; it returns the guest's serial
// channel.
func migrationHosts(ctx context.Context, t *testing.T) (a, b *host, s *qemutest.Serial) {
	t.Helper()
	run := qemutest.ShortTempDir(t)
	t.Setenv("XDG_RUNTIME_DIR", run)
	accel := "tcg"
	if qemutest.KVMAvailable() {
		accel = "kvm"
	}
	t.Setenv("VTPM_ACCEL", accel)
	img, err := qemutest.BuildImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, b = newHost(t, "a"), newHost(t, "b")
	a.start(t)
	b.start(t)
	bCerts := b.certs(t)
	a.mustVTPM(t, "host", "trust", "b", b.addr, bCerts)
	b.mustVTPM(t, "host", "trust", "a", a.addr, a.certs(t))
	b.mustVTPM(t, "host", "allow-path", img.Kernel, img.Initrd)
	a.mustVTPM(t, "vm", "create", "mig", "--os", "linux", "--tpm", "--disk-size", "64M", "--memory", "256M", "--cpus", "1",
		"--kernel", img.Kernel, "--initrd", img.Initrd, "--append", "quiet rdinit=/init no_timer_check")
	a.mustVTPM(t, "protector", "grant", "mig", bCerts)
	sock := filepath.Join(run, "ser.sock")
	a.mustVTPM(t, "vm", "start", "mig", "--serial-socket", sock)
	t.Cleanup(func() {
		a.vtpm(t, "vm", "stop", "mig", "--timeout", "0")
		b.vtpm(t, "vm", "stop", "mig", "--timeout", "0")
	})
	bctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	if s, err = qemutest.DialSerial(bctx, sock); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return a, b, s
}

// TestVMMigrateDestinationServiceKilled: B's host service is killed while
// the memory is sent. The migration fails naming its step, the guest on A
// keeps running and its TPM answers, B registers nothing, and B's service,
// started again, removes what it had prepared (bundle and processes).
func TestVMMigrateDestinationServiceKilled(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	a, b, s := migrationHosts(ctx, t)
	digest := strings.Repeat("cd", 32)
	if _, err := s.Run(ctx, "tpm2_pcrextend 16:sha256="+digest); err != nil {
		t.Fatal(err)
	}
	want, err := s.Run(ctx, "tpmtest pcr 16")
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(testutil.Binary(t), "vm", "migrate", "mig", "--to", "b", "--json")
	cmd.Env = append(os.Environ(), a.env()...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if !killed && strings.Contains(sc.Text(), `"phase":"memory"`) {
			b.stop()
			killed = true
		}
	}
	err = cmd.Wait()
	if !killed {
		t.Fatalf("no memory phase was reported; migrate: %v\n%s", err, stderr.String())
	}
	if err == nil {
		t.Fatal("the migration succeeded with the destination's service killed")
	}
	wantAll(t, "the failure", stderr.String(), "migrate VM mig to b", "failed", "keeps running here")
	t.Logf("failed as expected:\n%s", stderr.String())
	if got, err := s.Run(ctx, "tpmtest pcr 16"); err != nil || got != want {
		t.Fatalf("guest on A after the failure: PCR 16 %q, %v; want %q", got, err, want)
	}
	if _, err := s.Run(ctx, "tpmtest seal 0x81000001 && tpmtest unseal 0x81000001"); err != nil {
		t.Errorf("TPM on A after the failure: %v", err)
	}
	if vms := a.mustVTPM(t, "vm", "list", "-a"); !strings.Contains(vms, "running") {
		t.Errorf("A's VMs after the failure:\n%s", vms)
	}
	if vms := b.mustVTPM(t, "vm", "list", "-a"); strings.Contains(vms, "mig") {
		t.Errorf("B registered the VM:\n%s", vms)
	}
	b.start(t)
	if _, err := os.Stat(filepath.Join(b.root, "vms", "mig")); !os.IsNotExist(err) {
		t.Errorf("B's service, started again, left the prepared bundle: %v", err)
	}
	if out, _ := exec.Command("pgrep", "-f", filepath.Join(b.root, "vms", "mig")).Output(); len(out) > 0 {
		t.Errorf("processes of the prepared VM left on B: %s", out)
	}
}

// TestVMMigrateToFleetHost: a running VM whose TPM's protector has the
// fleet guardian's row migrates, without a grant, to a host registered
// with the key service that holds no row of it: B's pre-flight accepts
// the fleet row, B's vTPM runs unprivileged and adopts the TPM with the
// key the key service releases to B's host service, and the VM runs
// there.
func TestVMMigrateToFleetHost(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	run := qemutest.ShortTempDir(t)
	t.Setenv("XDG_RUNTIME_DIR", run)
	accel := "tcg"
	if qemutest.KVMAvailable() {
		accel = "kvm"
	}
	t.Setenv("VTPM_ACCEL", accel)
	img, err := qemutest.BuildImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	testutil.HostdBinary(t)
	ks := newKeyService(t)
	ks.start(t)
	ks.ks(t, "init", "--data-dir", ks.dir, "--server", ks.url())

	a, b := newHost(t, "a"), newHost(t, "b")
	searchable(t, run, b.dir)
	ks.register(t, b)
	a.start(t)
	b.start(t)
	waitFleet(t, b)
	// register exported B's certificates already.
	a.mustVTPM(t, "host", "trust", "b", b.addr, filepath.Join(b.dir, b.name+".pem"))
	b.mustVTPM(t, "host", "trust", "a", a.addr, a.certs(t))
	b.mustVTPM(t, "host", "allow-path", img.Kernel, img.Initrd)

	a.mustVTPM(t, "vm", "create", "fleetmig", "--os", "linux", "--tpm", "--disk-size", "64M", "--memory", "256M", "--cpus", "1",
		"--kernel", img.Kernel, "--initrd", img.Initrd, "--append", "quiet rdinit=/init no_timer_check")
	fleetPEM := filepath.Join(a.dir, "fleet.pem")
	ks.ks(t, append([]string{"fleet-guardian", "-o", fleetPEM}, ks.args()...)...)
	a.mustVTPM(t, "protector", "grant", "fleetmig", fleetPEM)
	sock := filepath.Join(run, "ser.sock")
	a.mustVTPM(t, "vm", "start", "fleetmig", "--serial-socket", sock)
	t.Cleanup(func() {
		a.vtpm(t, "vm", "stop", "fleetmig", "--timeout", "0")
		b.vtpm(t, "vm", "stop", "fleetmig", "--timeout", "0")
	})
	bctx, bcancel := context.WithTimeout(ctx, 4*time.Minute)
	s, err := qemutest.DialSerial(bctx, sock)
	bcancel()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	digest := strings.Repeat("5a", 32)
	if _, err := s.Run(ctx, "tpm2_pcrextend 16:sha256="+digest); err != nil {
		t.Fatal(err)
	}

	out := a.mustVTPM(t, "vm", "migrate", "fleetmig", "--to", "b")
	t.Logf("vm migrate:\n%s", out)
	if vms := a.mustVTPM(t, "vm", "list", "-a"); strings.Contains(vms, "fleetmig") {
		t.Errorf("A still lists the migrated VM:\n%s", vms)
	}
	assertAdoptedUnprivileged(t, b, "fleetmig")
	wantAll(t, "B's host service log", b.proc.Stderr.String(), "key service: released a TPM's key")
	var vms []vm.Summary
	if err := json.Unmarshal([]byte(b.mustVTPM(t, "vm", "list", "-a", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	running := false
	for _, v := range vms {
		running = running || (v.Name == "fleetmig" && v.State == "running")
	}
	if !running {
		t.Fatalf("VM fleetmig is not running on B: %+v", vms)
	}
}
