package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/attest/attesttest"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keyrelease"
	"vtpm/internal/testutil"
)

// keyService is a single-node vtpm-keyservice (embedded etcd) on loopback.
type keyService struct {
	dir, listen, clientURL, peerURL string
	proc                            *testutil.Proc
}

func (k *keyService) url() string    { return "https://" + k.listen }
func (k *keyService) admin() string  { return filepath.Join(k.dir, "admin.json") }
func (k *keyService) args() []string { return []string{"--bundle", k.admin()} }

func newKeyService(t *testing.T) *keyService {
	t.Helper()
	base := testutil.FreePorts(t, 3)
	return &keyService{dir: filepath.Join(t.TempDir(), "ks"), listen: fmt.Sprintf("127.0.0.1:%d", base),
		clientURL: fmt.Sprintf("http://127.0.0.1:%d", base+1), peerURL: fmt.Sprintf("http://127.0.0.1:%d", base+2)}
}

// start runs `vtpm keyservice serve` (through vtpm, as a user would).
func (k *keyService) start(t *testing.T) {
	t.Helper()
	testutil.KeyserviceBinary(t)
	cmd := exec.Command(testutil.Binary(t), "keyservice", "serve", "--data-dir", k.dir, "--listen", k.listen,
		"--client-url", k.clientURL, "--peer-url", k.peerURL, "--request-timeout", "2s")
	k.proc = testutil.StartCmd(t, cmd, "")
	if err := k.proc.WaitReady(k.listen, 60*time.Second); err != nil {
		t.Fatalf("key service: %v\n%s", err, k.proc.Stderr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("key service:\n%s", k.proc.Stderr)
		}
	})
}

// ks runs `vtpm keyservice ARGS…` as the key service's admin.
func (k *keyService) ks(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(testutil.Binary(t), append([]string{"keyservice"}, args...)...)
	cmd.Env = os.Environ()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vtpm keyservice %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// register registers h with the key service (key mode) and puts its
// client bundle in h's data root, where its host service looks for it.
func (k *keyService) register(t *testing.T, h *host) {
	t.Helper()
	k.ks(t, append([]string{"host", "add", h.name, "--guardian", h.certs(t), "-o", filepath.Join(h.root, keyrelease.BundleFile)}, k.args()...)...)
}

// waitFleet waits until h's host service has fetched the fleet guardian
// and attested (its log says so).
func waitFleet(t *testing.T, h *host) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		_, err := os.Stat(filepath.Join(h.root, hostsvc.FleetFile))
		if err == nil && strings.Contains(h.proc.Stderr.String(), "key service: attested") {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s's host service did not reach the key service:\n%s", h.name, h.proc.Stderr)
}

// swtpmArgs serve the TPM in dir on a data port and a control port.
func swtpmArgs(dir string, port int) []string {
	return []string{"swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + dir,
		"--server", fmt.Sprintf("type=tcp,port=%d", port), "--ctrl", fmt.Sprintf("type=tcp,port=%d", port+1),
		"--flags", "not-need-init,startup-clear"}
}

// serveTPM starts `vtpm swtpm socket` on h for the TPM in dir and proves
// that libtpms opened it: its PCR 7 and random bytes read with go-tpm.
func serveTPM(t *testing.T, h *host, dir string) {
	t.Helper()
	port := testutil.FreePorts(t, 2)
	cmd := exec.Command(testutil.Binary(t), swtpmArgs(dir, port)...)
	cmd.Env = append(os.Environ(), h.env()...)
	p := testutil.StartCmd(t, cmd, fmt.Sprintf("127.0.0.1:%d", port))
	defer p.Kill()
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	tpm := framed{c}
	pcrs, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(7)}}}}.Execute(tpm)
	if err != nil {
		t.Fatalf("on %s: TPM2_PCR_Read: %v\n%s", h.name, err, p.Stderr)
	}
	if n := len(pcrs.PCRValues.Digests); n != 1 || len(pcrs.PCRValues.Digests[0].Buffer) != 32 {
		t.Fatalf("on %s: TPM2_PCR_Read answered %d digests", h.name, n)
	}
	r, err := tpm2.GetRandom{BytesRequested: 16}.Execute(tpm)
	if err != nil || len(r.RandomBytes.Buffer) != 16 {
		t.Fatalf("on %s: TPM2_GetRandom: %v", h.name, err)
	}
}

// refused runs `vtpm swtpm socket` on h for dir, which must fail to start,
// and returns what it said.
func refused(t *testing.T, h *host, dir string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	port := testutil.FreePorts(t, 2)
	cmd := exec.CommandContext(ctx, testutil.Binary(t), swtpmArgs(dir, port)...)
	cmd.Env = append(os.Environ(), h.env()...)
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("on %s: the vTPM of %s started:\n%s", h.name, dir, out)
	}
	t.Logf("on %s: the vTPM of %s refused to start:\n%s", h.name, dir, out)
	return string(out)
}

// framed is a go-tpm transport over a TPM's raw data channel: one
// command, one response read by its header's length.
type framed struct{ rw io.ReadWriter }

func (f framed) Send(cmd []byte) ([]byte, error) {
	if _, err := f.rw.Write(cmd); err != nil {
		return nil, err
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(f.rw, hdr); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[2:6])
	if n < 10 || n > 1<<16 {
		return nil, fmt.Errorf("response of %d bytes", n)
	}
	rsp := make([]byte, n)
	copy(rsp, hdr)
	_, err := io.ReadFull(f.rw, rsp[10:])
	return rsp, err
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
		if !e.Type().IsRegular() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// auditRecord is a record of `vtpm keyservice audit --json` (protojson).
type auditRecord struct {
	Event   string `json:"event"`
	Host    string `json:"host"`
	TPM     string `json:"tpm"`
	Outcome string `json:"outcome"`
	Reason  string `json:"reason"`
}

// A key service and two hosts on loopback: a TPM whose protector admits
// only the fleet guardian opens on the registered, attested host (the key
// through its host service, a real libtpms answering), and is refused on a
// host the key service does not know, with the reason; with the key
// service stopped, the start fails naming the node tried and its state,
// while a TPM that still has the host's own row opens without it. The
// audit log holds the release and the denial.
func TestFleetKeyRelease(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "the host service runs as root")
	}
	testutil.HostdBinary(t)
	ks := newKeyService(t)
	ks.start(t)
	ks.ks(t, "init", "--data-dir", ks.dir, "--server", ks.url())

	a, b := newHost(t, "alpha"), newHost(t, "beta")
	ks.register(t, a)
	ks.register(t, b)
	a.start(t)
	b.start(t)
	waitFleet(t, a)
	waitFleet(t, b)
	// beta leaves the fleet: its certificate still authenticates it, but
	// the key service no longer knows the host.
	ks.ks(t, append([]string{"host", "remove", b.name}, ks.args()...)...)

	// The TPM's owner is a third data root that no host here holds or
	// trusts; its protector gets the fleet guardian's row from the
	// certificates the key service prints.
	owner := newHost(t, "owner")
	src := filepath.Join(owner.dir, "tpm")
	owner.mustVTPM(t, "tpm", "manufacture", src)
	fleetPEM := filepath.Join(owner.dir, "fleet.pem")
	ks.ks(t, append([]string{"fleet-guardian", "-o", fleetPEM}, ks.args()...)...)
	owner.mustVTPM(t, "protector", "grant", src, fleetPEM)

	onA, onB := filepath.Join(a.dir, "tpm"), filepath.Join(b.dir, "tpm")
	copyDir(t, src, onA)
	copyDir(t, src, onB)

	// alpha: no guardian of alpha's opens it; the key service releases it.
	serveTPM(t, a, onA)
	wantAll(t, "alpha's host service log", a.proc.Stderr.String(), "key service: released a TPM's key")

	// beta: refused, and the reason said where the vTPM's start failed.
	out := refused(t, b, onB)
	wantAll(t, "beta's refused start", out, "no guardian of this host opens TPM", "the key service did not release its key",
		"host beta denied: the host is not registered", "fix: register the host: `vtpm keyservice host add beta")

	// A TPM of alpha's own, granted to the fleet with --key-service: its
	// own row opens it whatever the key service's state.
	own := filepath.Join(a.dir, "own")
	a.mustVTPM(t, "tpm", "manufacture", own)
	got := a.mustVTPM(t, "protector", "grant", own, "--key-service", ks.url())
	wantAll(t, "grant --key-service", got, "granted fleet")

	// A VM born with the fleet row.
	got = a.mustVTPM(t, "vm", "create", "fleetvm", "--os", "linux", "--tpm", "--no-disk", "--key-service", ks.url())
	wantAll(t, "vm create --key-service", got, "granted the key service's fleet guardian fleet")
	var shown struct {
		Rows []struct {
			Name string `json:"name"`
		} `json:"rows"`
	}
	if err := json.Unmarshal([]byte(a.mustVTPM(t, "protector", "show", "fleetvm", "--json")), &shown); err != nil {
		t.Fatal(err)
	}
	if n := len(shown.Rows); n != 2 || shown.Rows[1].Name != "fleet" {
		t.Errorf("fleetvm's protector rows: %+v, want the host's and the fleet's", shown.Rows)
	}

	audit := ks.ks(t, append([]string{"audit", "--json"}, ks.args()...)...)
	var log struct {
		Records []auditRecord `json:"records"`
	}
	if err := json.Unmarshal([]byte(audit), &log); err != nil {
		t.Fatalf("%v\n%s", err, audit)
	}
	var released, denied bool
	for _, r := range log.Records {
		released = released || (r.Event == "release" && r.Host == a.name && r.Outcome == "ok")
		denied = denied || (r.Event == "deny" && r.Host == b.name && r.Reason == "not-registered")
	}
	if !released || !denied {
		t.Errorf("audit log: release to alpha %v, denial of beta %v:\n%s", released, denied, audit)
	}

	// The key service stops: a fleet-only TPM cannot start, and the error
	// names the node tried and its state; alpha's own TPM starts.
	ks.proc.Kill()
	out = refused(t, a, onA)
	wantAll(t, "alpha's start without the key service", out, "key service unavailable; tried "+ks.url()+" (unreachable")
	serveTPM(t, a, own)

	// Nor is a VM born for the fleet while the key service is down: the
	// fleet guardian is asked for first, and no VM is left behind.
	out, err := a.vtpm(t, "vm", "create", "late", "--os", "linux", "--tpm", "--no-disk", "--key-service", ks.url())
	if err == nil {
		t.Fatalf("vm create --key-service with the key service down:\n%s", out)
	}
	wantAll(t, "vm create without the key service", out, "cannot fetch the fleet guardian from the key service at "+ks.url())
	if out, err := a.vtpm(t, "vm", "show", "late"); err == nil {
		t.Errorf("a VM was left behind:\n%s", out)
	}
}

// Asking for the key service without this host's client bundle says what
// is missing, before anything starts.
func TestKeyServiceNeedsTheHostsBundle(t *testing.T) {
	h := newHost(t, "lone")
	tpm := filepath.Join(h.dir, "tpm")
	h.mustVTPM(t, "tpm", "manufacture", tpm)
	for _, tt := range []struct {
		args []string
		want []string
	}{
		{[]string{"host", "serve", "--socket", h.keySock, "--data-root", h.root, "--key-service", "https://127.0.0.1:1"},
			[]string{"--key-service needs this host's client bundle of the key service", keyrelease.BundleFile}},
		{[]string{"protector", "grant", tpm, "--key-service", "https://127.0.0.1:1"},
			[]string{"cannot fetch the fleet guardian from the key service at https://127.0.0.1:1", "key service client bundle"}},
	} {
		out, err := h.vtpm(t, tt.args...)
		if err == nil {
			t.Errorf("vtpm %s succeeded:\n%s", strings.Join(tt.args, " "), out)
			continue
		}
		wantAll(t, "vtpm "+strings.Join(tt.args, " "), out, tt.want...)
	}
}

// TPM mode: the admin captures the attestation policy on a reference host
// and registers two hosts with their TPMs' EKs; each host service attests
// with its TPM (a swtpm booted as the reference, and one whose PCR 7
// differs). A fleet-only TPM opens on the first; on the second the start
// fails with the reason its attestation failed.
func TestFleetKeyReleaseTPMMode(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "the host service runs as root")
	}
	testutil.HostdBinary(t)
	ks := newKeyService(t)
	ks.start(t)
	ks.ks(t, "init", "--data-dir", ks.dir, "--server", ks.url())
	ref := attesttest.Start(t, attesttest.Reference)
	ks.ks(t, append([]string{"policy", "capture", "fleet-boot", "--class", "x86-ovmf", "--tpm", ref.Spec, "--event-log", ref.EventLog}, ks.args()...)...)

	hosts := map[string]*host{}
	for name, boot := range map[string]attesttest.Boot{"good": attesttest.Reference, "pcr7": attesttest.OtherDB} {
		h := newHost(t, name)
		tpm := attesttest.Start(t, boot)
		ek := filepath.Join(h.dir, "ek.pem")
		ks.ks(t, "host", "ek", "--tpm", tpm.Spec, "-o", ek)
		ks.ks(t, append([]string{"host", "add", name, "--mode", "tpm", "--ek", ek, "--policy", "fleet-boot", "--guardian", h.certs(t),
			"-o", filepath.Join(h.root, keyrelease.BundleFile)}, ks.args()...)...)
		h.start(t, "--attest", "tpm", "--attest-tpm", tpm.Spec, "--event-log", tpm.EventLog)
		hosts[name] = h
	}
	waitFleet(t, hosts["good"])

	owner := newHost(t, "owner")
	src := filepath.Join(owner.dir, "tpm")
	owner.mustVTPM(t, "tpm", "manufacture", src)
	fleetPEM := filepath.Join(owner.dir, "fleet.pem")
	ks.ks(t, append([]string{"fleet-guardian", "-o", fleetPEM}, ks.args()...)...)
	owner.mustVTPM(t, "protector", "grant", src, fleetPEM)

	good, pcr7 := hosts["good"], hosts["pcr7"]
	onGood, onPCR7 := filepath.Join(good.dir, "tpm"), filepath.Join(pcr7.dir, "tpm")
	copyDir(t, src, onGood)
	copyDir(t, src, onPCR7)
	serveTPM(t, good, onGood)
	// pcr7's service knows the fleet guardian once it has asked, whether
	// or not its attestation passed.
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(pcr7.proc.Stderr.String(), "key service: fleet guardian") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	out := refused(t, pcr7, onPCR7)
	wantAll(t, "pcr7's refused start", out, "the key service did not release its key", "PCR 7 differs from policy fleet-boot")
}
