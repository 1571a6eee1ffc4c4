package migrate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/qemutest"
	"vtpm/internal/seal"
	"vtpm/internal/testutil"
	"vtpm/internal/vm"
)

// direct bypasses the kernel's resource manager so transient objects stay loaded.
const direct = "export TPM2TOOLS_TCTI=device:/dev/tpm0; "

var nameRE = regexp.MustCompile(`(?m)^name: ([0-9a-f]+)$`)

// testHost is one simulated host: a data root, its registry, and its
// receiving side listening on its own loopback address.
type testHost struct {
	root string
	reg  *vm.Registry
	dst  *Local
	dir  string
}

func newTestHost(t *testing.T, dir, name, ip string) *testHost {
	t.Helper()
	root := filepath.Join(dir, name)
	reg := vm.NewRegistry(root, func() (*keybroker.Broker, error) {
		return keybroker.Open(root, keystore.Options{HostTPM: "none"})
	})
	reg.Exe = testutil.Binary(t)
	accel := "tcg"
	if qemutest.KVMAvailable() {
		accel = "kvm"
	}
	h := &testHost{root: root, reg: reg, dir: dir}
	h.dst = &Local{Registry: reg, Host: name, IP: ip, Accel: accel,
		SerialSocket: func(vm string) string { return filepath.Join(dir, name+"-"+vm+".sock") }}
	return h
}

func (h *testHost) broker(t *testing.T) *keybroker.Broker {
	t.Helper()
	k, err := h.reg.Keys()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// trustOwner makes h trust other's guardian as the owner of TPMs, as
// trusting a peer host does.
func (h *testHost) trustOwner(t *testing.T, other *testHost) {
	t.Helper()
	ko := other.broker(t)
	g, err := ko.Local()
	ko.Close()
	if err != nil {
		t.Fatal(err)
	}
	k := h.broker(t)
	defer k.Close()
	if _, err := k.Trust(g.Public()); err != nil {
		t.Fatal(err)
	}
}

// guest is a VM booted on a test host, with its serial command channel.
type guest struct {
	*qemutest.Serial
	name string
}

func (g *guest) must(ctx context.Context, t *testing.T, cmd string) string {
	t.Helper()
	out, err := g.Run(ctx, cmd)
	if err != nil {
		t.Fatalf("%s: guest: %s: %v", g.name, cmd, err)
	}
	return strings.TrimSpace(out)
}

func dialGuest(ctx context.Context, t *testing.T, name, sock string) *guest {
	t.Helper()
	bctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	s, err := qemutest.DialSerial(bctx, sock)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	t.Cleanup(func() { s.Close() })
	return &guest{Serial: s, name: name}
}

// bootVM creates VM name on h with a vTPM and a 64 MiB disk in its bundle,
// booting the test guest, and starts it.
func bootVM(ctx context.Context, t *testing.T, h *testHost, name string) *guest {
	t.Helper()
	return bootVMWith(ctx, t, h, name, nil)
}

// bootVMWith is bootVM; edit, when set, changes the VM's configuration
// before it starts.
func bootVMWith(ctx context.Context, t *testing.T, h *testHost, name string, edit func(*vm.Config)) *guest {
	t.Helper()
	img, err := qemutest.BuildImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	on := true
	if _, err := h.reg.Create(vm.CreateOptions{Name: name, OS: vm.Linux, TPM: &on, DiskSize: "64M", Memory: "256M", CPUs: 1,
		Kernel: img.Kernel, Initrd: img.Initrd, Append: "quiet rdinit=/init no_timer_check"}); err != nil {
		t.Fatal(err)
	}
	v, err := h.reg.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		edit(v.Config)
		if err := v.Save(); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(h.dir, "src-"+name+".sock")
	if _, err := h.reg.Start(ctx, v, vm.StartOptions{SerialSocket: sock, Accel: h.dst.Accel}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopVM(t, h, name) })
	return dialGuest(ctx, t, name, sock)
}

func stopVM(t *testing.T, h *testHost, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if v, err := h.reg.Open(name); err == nil && h.reg.State(v).Running() {
		if _, err := h.reg.Stop(ctx, v, 0); err != nil {
			t.Logf("stop %s: %v", name, err)
		}
		if t.Failed() {
			for _, f := range []string{"serial.log", "qemu.log", "tpm.log"} {
				b, _ := os.ReadFile(filepath.Join(v.Dir, vm.LogDir, f))
				t.Logf("%s %s:\n%s", name, f, tail(string(b), 30))
			}
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// setUp makes hosts A (source, 127.0.0.1) and B (destination, 127.0.0.2)
// where B trusts A as an owner but A's TPMs do not admit B's guardian.
func setUp(t *testing.T) (ctx context.Context, a, b *testHost) {
	qemutest.SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	dir := qemutest.ShortTempDir(t)
	run := filepath.Join(dir, "run")
	if err := os.Mkdir(run, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("XDG_RUNTIME_DIR", run)
	t.Setenv("VTPM_HOST_TPM", "none")
	a = newTestHost(t, dir, "a", "127.0.0.1")
	b = newTestHost(t, dir, "b", "127.0.0.2")
	img, err := qemutest.BuildImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The direct-boot files are shared: the same paths on both hosts.
	if _, err := b.reg.AllowPaths(img.Kernel, img.Initrd); err != nil {
		t.Fatal(err)
	}
	b.trustOwner(t, a)
	return ctx, a, b
}

func extendedZero(t *testing.T, digestHex string) string {
	d, err := hex.DecodeString(digestHex)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(append(make([]byte, 32), d...))
	return hex.EncodeToString(sum[:])
}

// assertNothingOn checks that host h has no trace of VM name: not
// registered, no bundle, no processes.
func assertNothingOn(t *testing.T, h *testHost, name string) {
	t.Helper()
	if e, err := h.reg.Find(name); err == nil {
		t.Errorf("VM %s is registered on %s: %+v", name, h.dst.Host, e)
	}
	if _, err := os.Stat(filepath.Join(h.reg.VMsDir(), name)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a bundle of %s is left on %s: %v", name, h.dst.Host, err)
	}
	out, _ := exec.Command("pgrep", "-f", filepath.Join(h.reg.VMsDir(), name)).Output()
	if s := strings.TrimSpace(string(out)); s != "" {
		t.Errorf("processes of %s left on %s: %s", name, h.dst.Host, s)
	}
}

// TestLiveMigration migrates a running guest that extended PCR 16, loaded
// a key, sealed a secret to PCR 7 and wrote its disk from host A to host
// B: refused in pre-flight, naming B's guardian, while the protector does
// not admit it (nothing started on B, the guest on A keeps running); with
// Grant it completes, and on B the PCR, the loaded key, the unseal and the
// disk content are there, A keeps the TPM state as a backup only.
func TestLiveMigration(t *testing.T) {
	ctx, a, b := setUp(t)
	const name = "mig"
	g := bootVM(ctx, t, a, name)
	digest := strings.Repeat("cd", 32)
	g.must(ctx, t, direct+"tpm2_pcrextend 16:sha256="+digest)
	// Sealed first: the loaded key and its parent then keep two of the
	// TPM's three transient slots.
	g.must(ctx, t, "tpmtest seal 0x81000001")
	g.must(ctx, t, direct+`tpm2_createprimary -Q -C o -c /tmp/p.ctx &&
tpm2_create -Q -C 0x80000000 -G ecc -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' -u /tmp/k.pub -r /tmp/k.priv &&
tpm2_load -Q -C 0x80000000 -u /tmp/k.pub -r /tmp/k.priv -c /tmp/k.ctx`)
	m := nameRE.FindStringSubmatch(g.must(ctx, t, direct+"tpm2_readpublic -c 0x80000001"))
	if m == nil {
		t.Fatal("no name in tpm2_readpublic output")
	}
	keyName := m[1]
	marker := "vtpm-migration-marker-4c1d"
	g.must(ctx, t, "test -b /dev/vda") // the disk, not a file in /dev
	g.must(ctx, t, "printf "+marker+" | dd of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null")

	src := &Source{Registry: a.reg, Host: "a"}
	kb := b.broker(t)
	bg, err := kb.Local()
	kb.Close()
	if err != nil {
		t.Fatal(err)
	}

	// Refused: B's guardian is not admitted.
	_, err = src.Migrate(ctx, name, b.dst, Options{})
	var pe *PreflightError
	if !errors.As(err, &pe) {
		t.Fatalf("migration to a host the protector does not admit: %v, want a pre-flight refusal", err)
	}
	t.Logf("refused as expected:\n%v", err)
	if !strings.Contains(err.Error(), bg.Fingerprint()) || !strings.Contains(err.Error(), bg.Name()) {
		t.Errorf("the refusal does not name B's guardian %s (%s):\n%v", bg.Name(), bg.Fingerprint(), err)
	}
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("refusal kind %v, want failed precondition", errdefs.KindOf(err))
	}
	granted := false
	for _, r := range errdefs.Remedies(err) {
		if r.Action == errdefs.ActionVMMigrateGrant && r.Args["vm"] == name && r.Args["host"] == "b" {
			granted = true
		}
	}
	if !granted {
		t.Errorf("the refusal does not offer the grant: %+v", errdefs.Remedies(err))
	}
	assertNothingOn(t, b, name)
	if got := g.must(ctx, t, "tpmtest pcr 16"); got != extendedZero(t, digest) {
		t.Fatalf("guest on A after the refusal: PCR 16 = %s", got)
	}

	// Written just before the migration: must arrive too.
	late := "vtpm-late-write-77ab"
	g.must(ctx, t, "printf "+late+" | dd of=/dev/vda bs=512 seek=4096 conv=fsync 2>/dev/null")
	ramMarker := "vtpm-ram-marker-5e0f"
	g.must(ctx, t, "echo "+ramMarker+" > /tmp/ram-marker")
	va, err := a.reg.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	tpmID, err := seal.Identify(va.TPMDir())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var phases []string
	tapB := &tapped{Local: b.dst, t: t}
	res, err := src.Migrate(ctx, name, tapB, Options{Grant: true, Progress: func(p Progress) {
		mu.Lock()
		defer mu.Unlock()
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopVM(t, b, name) })
	t.Logf("migrated: %+v; phases %v", res, phases)
	for _, want := range []string{"pre-flight", "prepare", "disks", "memory", "switchover", "commit", "done"} {
		if !strings.Contains(" "+strings.Join(phases, " ")+" ", " "+want+" ") {
			t.Errorf("no %q phase in the progress: %v", want, phases)
		}
	}
	if res.Granted == "" || !strings.Contains(res.Granted, bg.Fingerprint()) {
		t.Errorf("result names no grant of B's guardian: %q", res.Granted)
	}
	if res.DiskBytes < 64<<20 || res.RAMBytes == 0 {
		t.Errorf("result: %d disk bytes, %d RAM bytes; want the whole 64 MiB disk and some memory", res.DiskBytes, res.RAMBytes)
	}

	// What crossed the network was TLS, and none of the guest's memory,
	// disk or TPM state shows in it.
	for what, tp := range map[string]*tap{"migration stream": tapB.mig, "NBD": tapB.nbd} {
		seen := tp.bytes()
		// NBD carries little: QEMU sends the empty parts of the disk as
		// write-zeroes requests.
		if tp.conns == 0 || len(seen) < 4096 {
			t.Errorf("%s: %d connections, %d bytes through the tap", what, tp.conns, len(seen))
			continue
		}
		// The migration stream is TLS from its first byte; NBD negotiates
		// in clear until its STARTTLS option, then shakes hands.
		hello := bytes.Index(seen, []byte{0x16, 0x03})
		if hello < 0 || (what == "migration stream" && hello != 0) || hello > 256 {
			t.Errorf("%s: the TLS handshake is at %d: % x", what, hello, seen[:min(len(seen), 64)])
		}
		for _, clear := range []string{marker, late, ramMarker, tpmID.String(), "vtpm-test-secret", `"protector"`} {
			if bytes.Contains(seen, []byte(clear)) {
				t.Errorf("%s carries %q in clear", what, clear)
			}
		}
		t.Logf("%s: %d bytes over %d TLS connections", what, len(seen), tp.conns)
	}

	// A: gone, the TPM state kept as a backup.
	if _, err := a.reg.Find(name); err == nil {
		t.Errorf("VM %s is still registered on A", name)
	}
	if res.Backup == "" {
		t.Error("no TPM backup on A")
	} else if _, err := os.Stat(filepath.Join(res.Backup, keybroker.ProtectorFile)); err != nil {
		t.Errorf("TPM backup on A: %v", err)
	}

	// B: registered, running, the TPM and disk arrived.
	v, err := b.reg.Open(name)
	if err != nil {
		t.Fatalf("VM %s on B: %v", name, err)
	}
	if !b.reg.State(v).Running() {
		t.Fatalf("VM %s is not running on B", name)
	}
	gb := dialGuest(ctx, t, name+"@b", b.dst.SerialSocket(name))
	if got := gb.must(ctx, t, "tpmtest pcr 16"); got != extendedZero(t, digest) {
		t.Errorf("PCR 16 on B = %s, want %s", got, extendedZero(t, digest))
	}
	m = nameRE.FindStringSubmatch(gb.must(ctx, t, direct+"tpm2_readpublic -c 0x80000001"))
	if m == nil || m[1] != keyName {
		t.Errorf("loaded key on B: %v, want name %s", m, keyName)
	}
	gb.must(ctx, t, direct+`echo migrated > /tmp/msg &&
tpm2_sign -c 0x80000001 -g sha256 -o /tmp/sig /tmp/msg &&
tpm2_verifysignature -c 0x80000001 -g sha256 -m /tmp/msg -s /tmp/sig`)
	if got := gb.must(ctx, t, "tpmtest unseal 0x81000001"); got != "vtpm-test-secret" {
		t.Errorf("unseal on B = %q", got)
	}
	if got := gb.must(ctx, t, "cat /tmp/ram-marker"); got != ramMarker {
		t.Errorf("guest memory on B: %q", got)
	}
	gb.must(ctx, t, "test -b /dev/vda && echo 3 > /proc/sys/vm/drop_caches")
	for off, want := range map[string]string{"2048": marker, "4096": late} {
		if got := gb.must(ctx, t, "dd if=/dev/vda bs=512 skip="+off+" count=1 2>/dev/null | head -c "+itoa(len(want))); got != want {
			t.Errorf("disk on B at sector %s = %q, want %q", off, got, want)
		}
	}
	// And in B's disk image itself, once QEMU has flushed it.
	if _, err := b.reg.Stop(ctx, v, 0); err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(t.TempDir(), "disk.raw")
	if out, err := exec.Command("qemu-img", "convert", "-O", "raw", filepath.Join(v.Dir, "disk.qcow2"), raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	data, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if string(data[2048*512:2048*512+len(marker)]) != marker {
		t.Errorf("B's disk image lacks the marker (found at %d; %d bytes)", strings.Index(string(data), marker), len(data))
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// preparing records what the destination prepared.
type preparing struct {
	*Local
	inc *Incoming
}

func (p *preparing) Prepare(ctx context.Context, req *PrepareRequest) (*Incoming, error) {
	inc, err := p.Local.Prepare(ctx, req)
	p.inc = inc
	return inc, err
}

// TestLiveMigrationSharedDisk migrates a guest with a disk in its bundle
// and one outside both bundles, at a path both hosts allow: the bundle's
// disk is mirrored over NBD, the shared one is not exported but opened in
// place on B; what the guest wrote to it on A and then on B is in the one
// file, and the source's markers are gone.
func TestLiveMigrationSharedDisk(t *testing.T) {
	ctx, a, b := setUp(t)
	const name = "shared"
	dir := filepath.Join(a.dir, "storage")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "data.raw")
	if err := os.WriteFile(disk, make([]byte, 16<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, h := range []*testHost{a, b} {
		if _, err := h.reg.AllowPaths(dir); err != nil {
			t.Fatal(err)
		}
	}
	g := bootVMWith(ctx, t, a, name, func(c *vm.Config) {
		c.Disks = append(c.Disks, vm.Disk{Path: disk, Format: "raw"})
	})
	onA, onB := "vtpm-shared-from-a-19c2", "vtpm-shared-from-b-7d40"
	g.must(ctx, t, "test -b /dev/vdb")
	g.must(ctx, t, "printf "+onA+" | dd of=/dev/vdb bs=512 seek=100 conv=fsync 2>/dev/null")

	dst := &preparing{Local: b.dst}
	res, err := (&Source{Registry: a.reg, Host: "a"}).Migrate(ctx, name, dst, Options{Grant: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopVM(t, b, name) })
	t.Logf("migrated: %+v; exports %v", res, dst.inc.Exports)
	if _, ok := dst.inc.Exports[0]; !ok {
		t.Errorf("the bundle's disk was not exported for the mirror: %v", dst.inc.Exports)
	}
	if e, ok := dst.inc.Exports[1]; ok {
		t.Errorf("the shared disk was exported (%s): it is copied, not opened in place", e)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".vtpm-shared-*")); len(left) > 0 {
		t.Errorf("markers left beside the shared disk: %v", left)
	}

	gb := dialGuest(ctx, t, name+"@b", b.dst.SerialSocket(name))
	gb.must(ctx, t, "echo 3 > /proc/sys/vm/drop_caches")
	if got := gb.must(ctx, t, "dd if=/dev/vdb bs=512 skip=100 count=1 2>/dev/null | head -c "+itoa(len(onA))); got != onA {
		t.Errorf("the shared disk on B at sector 100 = %q, want %q", got, onA)
	}
	gb.must(ctx, t, "printf "+onB+" | dd of=/dev/vdb bs=512 seek=200 conv=fsync 2>/dev/null")
	v, err := b.reg.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.reg.Stop(ctx, v, 0); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	for off, want := range map[int]string{100: onA, 200: onB} {
		if got := string(data[off*512 : off*512+len(want)]); got != want {
			t.Errorf("the shared file at sector %d = %q, want %q", off, got, want)
		}
	}
	if _, err := os.Stat(filepath.Join(v.Dir, "data.raw")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("B made a copy of the shared disk in the bundle: %v", err)
	}
}

// dying is a destination whose host service goes away at a moment the
// test chooses: every call after that fails as an unreachable peer does.
type dying struct {
	*Local
	mu   sync.Mutex
	dead bool
	// noCommit fails the commit only: the destination goes wrong after
	// the switch-over, when the source has handed its disks over.
	noCommit bool
}

func (d *dying) kill() {
	d.mu.Lock()
	d.dead = true
	d.mu.Unlock()
}

func (d *dying) gone() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.dead {
		return errdefs.New(errdefs.ErrUnavailable, "host %s: connection refused", d.Host)
	}
	return nil
}

func (d *dying) Commit(ctx context.Context, vm string) error {
	if err := d.gone(); err != nil {
		return err
	}
	d.mu.Lock()
	no := d.noCommit
	d.mu.Unlock()
	if no {
		return errdefs.New(errdefs.ErrInternal, "host %s: the received VM did not resume", d.Host)
	}
	return d.Local.Commit(ctx, vm)
}

func (d *dying) Ready(ctx context.Context, vm string) error {
	if err := d.gone(); err != nil {
		return err
	}
	return d.Local.Ready(ctx, vm)
}

func (d *dying) Abort(ctx context.Context, vm string) error {
	if err := d.gone(); err != nil {
		return err
	}
	return d.Local.Abort(ctx, vm)
}

// TestMigrationFailures: the destination's QEMU killed, or its host service
// gone, during the migration, or the destination failing once the source
// has switched over: the migration fails naming the step, the
// source guest keeps running and its TPM answers, and B has no VM
// registered and (once its service is back) nothing left of it.
func TestMigrationFailures(t *testing.T) {
	for _, tc := range []struct {
		name string
		// inject runs at the first memory progress report.
		inject func(t *testing.T, b *testHost, d *dying)
		step   Step
	}{
		{"destination-qemu-killed", func(t *testing.T, b *testHost, _ *dying) {
			v, err := b.reg.IncomingVM("mig")
			if err != nil {
				t.Error(err)
				return
			}
			if pid := b.reg.State(v).QEMU; pid != 0 {
				syscall.Kill(pid, syscall.SIGKILL)
			} else {
				t.Error("no QEMU on B to kill")
			}
		}, StepMemory},
		{"destination-service-killed", func(_ *testing.T, _ *testHost, d *dying) { d.kill() }, StepMemory},
		{"destination-fails-after-switchover", func(_ *testing.T, _ *testHost, d *dying) {
			d.mu.Lock()
			d.noCommit = true
			d.mu.Unlock()
		}, StepCommit},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, a, b := setUp(t)
			const name = "mig"
			k := a.broker(t)
			kb := b.broker(t)
			bg, err := kb.Local()
			kb.Close()
			if err != nil {
				t.Fatal(err)
			}
			g := bootVM(ctx, t, a, name)
			v, err := a.reg.Open(name)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := k.Grant(v.TPMDir(), bg.Public()); err != nil {
				t.Fatal(err)
			}
			k.Close()
			digest := strings.Repeat("ef", 32)
			g.must(ctx, t, direct+"tpm2_pcrextend 16:sha256="+digest)

			d := &dying{Local: b.dst}
			var once sync.Once
			src := &Source{Registry: a.reg, Host: "a"}
			_, err = src.Migrate(ctx, name, d, Options{Progress: func(p Progress) {
				if p.Phase == "memory" {
					once.Do(func() { tc.inject(t, b, d) })
				}
			}})
			var se *StepError
			if !errors.As(err, &se) {
				t.Fatalf("migration with %s: %v, want a failed step", tc.name, err)
			}
			t.Logf("failed as expected:\n%v", err)
			if se.Step != tc.step {
				t.Errorf("failed step %q, want %q", se.Step, tc.step)
			}
			// The source runs and answers, its TPM too.
			if st := a.reg.State(v); !st.Running() {
				t.Fatalf("VM on A after the failure: %v", st)
			}
			if got := g.must(ctx, t, "tpmtest pcr 16"); got != extendedZero(t, digest) {
				t.Errorf("guest on A after the failure: PCR 16 = %s", got)
			}
			g.must(ctx, t, "tpmtest seal 0x81000002 still-works && tpmtest unseal 0x81000002")
			if _, err := a.reg.Find(name); err != nil {
				t.Errorf("VM unregistered on A: %v", err)
			}
			// B: nothing registered, even with its service gone.
			if _, err := b.reg.Find(name); err == nil {
				t.Errorf("VM %s is registered on B", name)
			}
			// B's service back: what it left half-done goes.
			if _, err := b.reg.CleanIncoming(ctx); err != nil {
				t.Errorf("clean up on B: %v", err)
			}
			assertNothingOn(t, b, name)
		})
	}
}
