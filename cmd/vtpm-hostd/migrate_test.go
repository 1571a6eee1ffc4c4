package main

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vtpm/internal/migrate"
	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
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
	a.start(t)
	b.start(t)
	a.mustVTPM(t, "host", "trust", "b", b.addr, b.certs(t))
	b.mustVTPM(t, "host", "trust", "a", a.addr, a.certs(t))
	b.mustVTPM(t, "host", "allow-path", img.Kernel, img.Initrd)

	a.mustVTPM(t, "vm", "create", "mig", "--os", "linux", "--tpm", "--disk-size", "64M", "--memory", "256M", "--cpus", "1",
		"--kernel", img.Kernel, "--initrd", img.Initrd, "--append", "quiet rdinit=/init no_timer_check")
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
}
