package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"vtpm/internal/fleet"
	"vtpm/internal/hostcheck"
	"vtpm/internal/testutil"
)

// needOVMF: VMs with a TPM are UEFI VMs, whose variable store comes from
// OVMF.
func needOVMF(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(hostcheck.FirmwareDir, hostcheck.OVMFVarsMS)); err != nil {
		testutil.Missing(t, "OVMF is not installed: %v", err)
	}
}

// trustEachOther makes every pair of hosts trust each other.
func trustEachOther(t *testing.T, hosts ...*host) {
	t.Helper()
	pems := map[*host]string{}
	for _, h := range hosts {
		pems[h] = h.certs(t)
	}
	for _, h := range hosts {
		for _, o := range hosts {
			if o != h {
				h.mustVTPM(t, "host", "trust", o.name, o.addr, pems[o])
			}
		}
	}
}

// stdout runs `vtpm ARGS…` on h and returns its standard output alone.
func (h *host) stdout(t *testing.T, args ...string) (string, error) {
	t.Helper()
	testutil.HostdBinary(t)
	cmd := exec.Command(testutil.Binary(t), args...)
	cmd.Env = append(os.Environ(), h.env()...)
	out, err := cmd.Output()
	return string(out), err
}

// vmJSON is what `vtpm vm show --json` prints, in part.
type vmJSON struct {
	VM struct {
		Name, UUID, Path, TPM string
	} `json:"vm"`
}

func (h *host) show(t *testing.T, name string) (vmJSON, bool) {
	t.Helper()
	out, err := h.vtpm(t, "vm", "show", name, "--json")
	if err != nil {
		return vmJSON{}, false
	}
	var v vmJSON
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("vm show --json: %v\n%s", err, out)
	}
	return v, true
}

// ek is the fingerprint of the first EK of VM name's TPM on h, as `vtpm
// tpm show` reads it from the TPM's state.
func (h *host) ek(t *testing.T, name string) string {
	t.Helper()
	v, ok := h.show(t, name)
	if !ok {
		t.Fatalf("VM %s is not on host %s", name, h.name)
	}
	out := h.mustVTPM(t, "tpm", "show", filepath.Join(v.VM.Path, "tpm"), "--json")
	var s struct {
		EKs []struct {
			Fingerprint string `json:"public_key_sha256"`
		} `json:"eks"`
	}
	if err := json.Unmarshal([]byte(out), &s); err != nil || len(s.EKs) == 0 || s.EKs[0].Fingerprint == "" {
		t.Fatalf("tpm show --json: %v\n%s", err, out)
	}
	return s.EKs[0].Fingerprint
}

// TestMoveCopyDeploy: a stopped VM with a manufactured TPM and a disk
// outside its bundle moves from a to b (refused in pre-flight until b is
// granted, then the same UUID and EK there, gone from a with a backup of
// its TPM kept); copies to a with a fresh EK (--tpm new) and the same one
// with a warning (--tpm copy); and a template of a is deployed on b with a
// fresh EK.
func TestMoveCopyDeploy(t *testing.T) {
	needOVMF(t)
	a, b := newHost(t, "a"), newHost(t, "b")
	a.start(t)
	b.start(t)
	trustEachOther(t, a, b)

	disk := filepath.Join(a.dir, "w1.raw")
	if err := os.WriteFile(disk, []byte("the guest's disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	a.mustVTPM(t, "vm", "create", "w1", "--os", "linux", "--tpm", "--disk", disk)
	orig, _ := a.show(t, "w1")
	ek0 := a.ek(t, "w1")

	out, err := a.vtpm(t, "vm", "move", "w1", "--to", "b")
	if err == nil {
		t.Fatalf("moved a TPM that b cannot open:\n%s", out)
	}
	wantAll(t, "refused move", out, "pre-flight on b refused VM w1 (nothing was sent)", "Its key protector admits:",
		"fix: admit b's guardian to the TPM's key protector, and move: `vtpm vm move w1 --to b --grant`")
	if _, ok := b.show(t, "w1"); ok {
		t.Fatal("b registered w1 after a refused pre-flight")
	}
	if _, ok := a.show(t, "w1"); !ok {
		t.Fatal("w1 left a after a refused pre-flight")
	}

	out = a.mustVTPM(t, "vm", "move", "w1", "--to", "b", "--grant", "--json")
	var res sendResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("vm move --json: %v\n%s", err, out)
	}
	if res.UUID != orig.VM.UUID || res.Backup == "" {
		t.Errorf("move: %+v; want UUID %s and a backup on a", res, orig.VM.UUID)
	}
	if _, err := os.Stat(res.Backup); err != nil {
		t.Errorf("the TPM's backup on a: %v", err)
	}
	if _, ok := a.show(t, "w1"); ok {
		t.Error("w1 is still registered on a after its move")
	}
	moved, ok := b.show(t, "w1")
	if !ok || moved.VM.UUID != orig.VM.UUID {
		t.Fatalf("w1 on b: %+v", moved)
	}
	if got := b.ek(t, "w1"); got != ek0 {
		t.Errorf("EK after the move %s, want %s", got, ek0)
	}
	// The backup stays on a until it is purged.
	out = a.mustVTPM(t, "vm", "delete", "w1", "--purge-backup", "--yes")
	wantAll(t, "vm delete --purge-backup", out, "removed the backup of VM w1's TPM state")
	if _, err := os.Stat(res.Backup); !os.IsNotExist(err) {
		t.Errorf("the purged backup: %v", err)
	}
	data, err := os.ReadFile(filepath.Join(moved.VM.Path, "disk0-w1.raw"))
	if err != nil || string(data) != "the guest's disk" {
		t.Errorf("the disk on b: %q, %v", data, err)
	}

	// Copies back to a.
	b.mustVTPM(t, "vm", "copy", "w1", "--to", "a", "--name", "fresh")
	if got := a.ek(t, "fresh"); got == ek0 {
		t.Error("--tpm new gave the copy the same EK")
	}
	out = b.mustVTPM(t, "vm", "copy", "w1", "--to", "a", "--name", "twin", "--tpm", "copy")
	wantAll(t, "vm copy --tpm copy", out, "WARNING: twin and w1 now share one EK")
	if got := a.ek(t, "twin"); got != ek0 {
		t.Errorf("--tpm copy: EK %s, want %s", got, ek0)
	}
	twin, _ := a.show(t, "twin")
	if twin.VM.UUID == orig.VM.UUID {
		t.Error("the copy kept the VM's UUID")
	}

	// A template on a, deployed on b.
	a.mustVTPM(t, "vm", "template", "fresh", "gold")
	out = a.mustVTPM(t, "vm", "deploy", "gold", "desk1", "--on", "b")
	wantAll(t, "vm deploy --on", out, "deployed gold to b as desk1", "TPM enabled")
	if got := b.ek(t, "desk1"); got == ek0 || got == a.ek(t, "fresh") {
		t.Error("the deployed VM's EK is not fresh")
	}
	if _, ok := a.show(t, "desk1"); ok {
		t.Error("deploy --on b registered the VM on a")
	}
}

// TestFleetTPMs: three hosts of five VMs each, one of them stopped. `tpm
// disable --all --hosts all` disables the VMs of the two others, reports
// the stopped host as unreachable, and fails; --json parses. vm list
// --hosts all lists them.
func TestFleetTPMs(t *testing.T) {
	needOVMF(t)
	a, b, c := newHost(t, "a"), newHost(t, "b"), newHost(t, "c")
	for _, h := range []*host{a, b, c} {
		h.start(t)
		for i := range 5 {
			h.mustVTPM(t, "vm", "create", fmt.Sprintf("%s-vm%d", h.name, i), "--os", "linux", "--tpm", "--no-disk")
		}
	}
	trustEachOther(t, a, b, c)
	c.stop()

	out, err := a.vtpm(t, "tpm", "disable", "--all", "--hosts", "all")
	if err == nil {
		t.Errorf("tpm disable with a host stopped succeeded:\n%s", out)
	}
	for _, h := range []string{"a", "b"} {
		for i := range 5 {
			wantAll(t, "tpm disable", out, fmt.Sprintf("%s: %s-vm%d: ok", h, h, i))
		}
	}
	wantAll(t, "tpm disable", out, "c: unreachable: ", "3 hosts, 10 VMs: 10 ok, 0 skipped, 0 failed; 1 unreachable")
	for _, h := range []*host{a, b} {
		if v, _ := h.show(t, h.name+"-vm3"); v.VM.TPM != "disabled" {
			t.Errorf("%s-vm3's TPM is %q, want disabled", h.name, v.VM.TPM)
		}
	}

	// Again, as JSON: the VMs already disabled, c still unreachable.
	out, err = a.stdout(t, "tpm", "disable", "--all", "--hosts", "all", "--json")
	if err == nil {
		t.Error("tpm disable --json with a host stopped succeeded")
	}
	var rep fleet.ChangeReport
	if jerr := json.Unmarshal([]byte(out), &rep); jerr != nil {
		t.Fatalf("--json: %v\n%s", jerr, out)
	}
	if rep.Summary.Unreachable != 1 || rep.Summary.OK != 10 || len(rep.Hosts) != 3 || rep.Hosts[2].Reachable || rep.Hosts[2].Error == "" {
		t.Errorf("--json report: %+v", rep)
	}

	out, err = a.stdout(t, "vm", "list", "--hosts", "all", "--json")
	if err == nil {
		t.Error("vm list with a host stopped succeeded")
	}
	var list fleet.ListReport
	if jerr := json.Unmarshal([]byte(out), &list); jerr != nil {
		t.Fatalf("vm list --json: %v\n%s", jerr, out)
	}
	if list.Summary.VMs != 10 || list.Summary.Unreachable != 1 || len(list.Hosts[1].VMs) != 5 || list.Hosts[1].VMs[0].TPM != "disabled" {
		t.Errorf("vm list --json: %+v", list)
	}

	// The reachable hosts alone: all well.
	out = a.mustVTPM(t, "tpm", "enable", "--all", "--hosts", "a,b")
	wantAll(t, "tpm enable", out, "b: b-vm4: ok", "2 hosts, 10 VMs: 10 ok, 0 skipped, 0 failed")
	wantAll(t, "vm list", a.mustVTPM(t, "vm", "list", "--hosts", "b"), "HOST", "b-vm0", "enabled")
}
