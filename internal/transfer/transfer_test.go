package transfer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/hostcheck"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/manufacture"
	"vtpm/internal/testutil"
	"vtpm/internal/vm"
)

// testHost is a VM registry on a data root of its own, with its own
// keystore and guardian: one host.
func testHost(t testing.TB) *vm.Registry {
	t.Helper()
	if _, err := os.Stat(filepath.Join(hostcheck.FirmwareDir, hostcheck.OVMFVarsMS)); err != nil {
		testutil.Missing(t, "OVMF is not installed: %v", err)
	}
	root := t.TempDir()
	return vm.NewRegistry(root, func() (*keybroker.Broker, error) {
		return keybroker.Open(root, keystore.Options{HostTPM: "none"})
	})
}

// ek is the fingerprint of the first EK of the TPM in dir on host h.
func ek(t *testing.T, h *vm.Registry, dir string) string {
	t.Helper()
	s, err := manufacture.Show(h.Keys, dir, "", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("read the TPM in %s: %v", dir, err)
	}
	if len(s.EKs) == 0 || s.EKs[0].Fingerprint == "" {
		t.Fatalf("the TPM in %s has no EK", dir)
	}
	return s.EKs[0].Fingerprint
}

// newVM creates a VM with a manufactured TPM and a sparse raw disk outside
// its bundle holding marker at 1 MiB.
func newVM(t *testing.T, h *vm.Registry, name string, marker []byte) *vm.VM {
	t.Helper()
	disk := filepath.Join(t.TempDir(), name+".raw")
	f, err := os.Create(disk)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(marker, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	tpm := true
	res, err := h.Create(vm.CreateOptions{Name: name, OS: vm.Linux, TPM: &tpm, Disk: disk})
	if err != nil {
		t.Fatal(err)
	}
	return res.VM
}

// admit lets to open the TPMs from's guardian owns, as `protector grant`
// on from and `guardian trust` on to would.
func admit(t testing.TB, from, to *vm.Registry, tpmDir string) {
	t.Helper()
	kf, err := from.Keys()
	if err != nil {
		t.Fatal(err)
	}
	defer kf.Close()
	kt, err := to.Keys()
	if err != nil {
		t.Fatal(err)
	}
	defer kt.Close()
	gf, err := kf.Local()
	if err != nil {
		t.Fatal(err)
	}
	gt, err := kt.Local()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kf.Grant(tpmDir, gt.Public()); err != nil {
		t.Fatal(err)
	}
	if _, err := kt.Trust(gf.Public()); err != nil {
		t.Fatal(err)
	}
}

func registered(h *vm.Registry) []string {
	es, _ := h.Entries()
	var names []string
	for _, e := range es {
		names = append(names, e.Name)
	}
	return names
}

// checkDisk checks that the VM's disk arrived inside its bundle with its
// content and size.
func checkDisk(t *testing.T, v *vm.VM, marker []byte) {
	t.Helper()
	if len(v.Config.Disks) != 1 || filepath.IsAbs(v.Config.Disks[0].Path) {
		t.Fatalf("disks %+v: want one, inside the bundle", v.Config.Disks)
	}
	b, err := os.ReadFile(v.File(v.Config.Disks[0].Path))
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 64<<20 || !bytes.Equal(b[1<<20:1<<20+len(marker)], marker) {
		t.Errorf("disk arrived with %d bytes, marker %q", len(b), b[1<<20:1<<20+len(marker)])
	}
}

func TestMove(t *testing.T) {
	a, b := testHost(t), testHost(t)
	marker := []byte("written on host A")
	v := newVM(t, a, "mover", marker)
	before := ek(t, a, v.TPMDir())
	ctx := context.Background()

	// B holds no guardian the protector admits: refused in pre-flight,
	// nothing sent, nothing registered on B, the VM still on A.
	_, err := Send(ctx, a, v, Local{Registry: b}, Options{Op: vm.OpMove, To: "b"})
	var pf *PreflightError
	var missing *keybroker.MissingKeyError
	if !errors.As(err, &pf) || !errors.As(err, &missing) || !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("move to a host that cannot open the TPM: %v; want a pre-flight refusal naming the guardians", err)
	}
	if rs := errdefs.Remedies(err); len(rs) == 0 || rs[0].Action != errdefs.ActionVMMoveGrant || rs[0].Args["to"] != "b" {
		t.Errorf("the refusal's first remedy is not the move with --grant: %+v", rs)
	}
	if got := registered(b); len(got) != 0 {
		t.Fatalf("B registered %v after a refused move", got)
	}
	if _, err := a.Open("mover"); err != nil {
		t.Fatalf("the VM left A after a refused move: %v", err)
	}

	// B trusts A's guardian as an owner (as trusting host A does); --grant
	// admits B's guardian to the protector.
	ka, _ := a.Keys()
	ga, _ := ka.Local()
	ka.Close()
	kb, _ := b.Keys()
	gb, _ := kb.Local()
	kb.Trust(ga.Public())
	kb.Close()
	res, err := Send(ctx, a, v, Local{Registry: b}, Options{Op: vm.OpMove, To: "b", Grant: gb.Public()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Open("mover"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("the moved VM is still registered on A: %v", err)
	}
	if res.Backup == "" {
		t.Error("no backup of the TPM state on A")
	} else if _, err := os.Stat(res.Backup); err != nil {
		t.Errorf("backup: %v", err)
	}
	moved, err := b.Open("mover")
	if err != nil {
		t.Fatal(err)
	}
	if moved.Config.UUID != v.Config.UUID {
		t.Errorf("the moved VM has UUID %s, want %s", moved.Config.UUID, v.Config.UUID)
	}
	if after := ek(t, b, moved.TPMDir()); after != before {
		t.Errorf("EK after the move %s, want the same %s", after, before)
	}
	checkDisk(t, moved, marker)
}

func TestCopyAndDeploy(t *testing.T) {
	a, b := testHost(t), testHost(t)
	marker := []byte("copy me")
	v := newVM(t, a, "orig", marker)
	orig := ek(t, a, v.TPMDir())
	ctx := context.Background()

	res, err := Send(ctx, a, v, Local{Registry: b}, Options{Op: vm.OpCopy, To: "b", TPM: vm.TPMNew})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Warnings) != 0 {
		t.Errorf("--tpm new warned: %v", res.Warnings)
	}
	fresh, err := b.Open("orig")
	if err != nil {
		t.Fatal(err)
	}
	if fresh.Config.UUID == v.Config.UUID {
		t.Error("the copy kept the source's UUID")
	}
	if got := ek(t, b, fresh.TPMDir()); got == orig {
		t.Error("--tpm new: the copy has the source's EK")
	}
	checkDisk(t, fresh, marker)
	if _, err := a.Open("orig"); err != nil {
		t.Errorf("the source left A after a copy: %v", err)
	}

	// --tpm copy needs B to open the TPM that travels, then re-keys it.
	if _, err := Send(ctx, a, v, Local{Registry: b}, Options{Op: vm.OpCopy, To: "b", Name: "twin", TPM: vm.TPMCopy}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("--tpm copy to a host that cannot open the TPM: %v", err)
	}
	admit(t, a, b, v.TPMDir())
	res, err = Send(ctx, a, v, Local{Registry: b}, Options{Op: vm.OpCopy, To: "b", Name: "twin", TPM: vm.TPMCopy})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Warnings) == 0 || !bytes.Contains([]byte(res.Warnings[0]), []byte("share one EK")) {
		t.Errorf("--tpm copy: warnings %v, want the shared EK", res.Warnings)
	}
	twin, err := b.Open("twin")
	if err != nil {
		t.Fatal(err)
	}
	if got := ek(t, b, twin.TPMDir()); got != orig {
		t.Errorf("--tpm copy: EK %s, want the source's %s", got, orig)
	}
	kb, _ := b.Keys()
	p, err := keybroker.ReadProtector(twin.TPMDir())
	if err != nil {
		t.Fatal(err)
	}
	gb, _ := kb.Local()
	kb.Close()
	if p.Owner().Fingerprint() != gb.Fingerprint() {
		t.Error("the re-keyed copy is not owned by B")
	}

	// A template deployed on B gets a fresh TPM there.
	tmpl, err := a.Template(v, "tmpl", "")
	if err != nil {
		t.Fatal(err)
	}
	// A template copied to B is a template there, still without a TPM.
	if _, err := Send(ctx, a, tmpl.VM, Local{Registry: b}, Options{Op: vm.OpCopy, To: "b", Name: "tmpl-b"}); err != nil {
		t.Fatal(err)
	}
	if c, err := b.Open("tmpl-b"); err != nil || !c.Config.Template || !c.Config.TPMRequired || c.Config.HasTPM() {
		t.Errorf("the template copied to B: %v %+v", err, c)
	}
	res, err = Send(ctx, a, tmpl.VM, Local{Registry: b}, Options{Op: vm.OpDeploy, To: "b", Name: "desk1"})
	if err != nil {
		t.Fatal(err)
	}
	desk, err := b.Open("desk1")
	if err != nil {
		t.Fatal(err)
	}
	if !desk.Config.TPMEnabled() || desk.Config.Template {
		t.Errorf("deployed VM: TPM %s, template %v", desk.Config.TPMStatus(), desk.Config.Template)
	}
	if got := ek(t, b, desk.TPMDir()); got == orig {
		t.Error("deploy: the VM has the source's EK")
	}
	if res.TPM != "enabled" {
		t.Errorf("deploy result TPM %q", res.TPM)
	}
}

// tamper changes the first occurrence of what in the stream.
type tamper struct {
	w    io.Writer
	what []byte
	done bool
}

func (t *tamper) Write(p []byte) (int, error) {
	if i := bytes.Index(p, t.what); i >= 0 && !t.done {
		q := bytes.Clone(p)
		q[i] ^= 0x40
		p, t.done = q, true
	}
	return t.w.Write(p)
}

type tampering struct {
	Local
	what string
}

func (d tampering) Receive(ctx context.Context, req *Request, send func(io.Writer) error) (*Arrived, error) {
	return d.Local.Receive(ctx, req, func(w io.Writer) error { return send(&tamper{w: w, what: []byte(d.what)}) })
}

func TestTamperedStreamRegistersNothing(t *testing.T) {
	a, b := testHost(t), testHost(t)
	v := newVM(t, a, "victim", []byte("the disk's data"))
	// A byte of vm.json (after the manifest, which names no OS), and one
	// of the disk.
	for _, at := range []string{`"linux"`, "the disk's data"} {
		_, err := Send(context.Background(), a, v, tampering{Local{Registry: b}, at}, Options{Op: vm.OpCopy, To: "b", TPM: vm.TPMNew})
		var se *StreamError
		if !errors.As(err, &se) || !errors.Is(err, errdefs.ErrDataLoss) {
			t.Fatalf("%s changed: %v; want the stream refused", at, err)
		}
		if got := registered(b); len(got) != 0 {
			t.Errorf("B registered %v from a tampered stream", got)
		}
		left, _ := os.ReadDir(IncomingDir(b))
		vms, _ := os.ReadDir(b.VMsDir())
		if len(left) != 0 || len(vms) != 0 {
			t.Errorf("a tampered stream left %v in incoming, %v in vms", left, vms)
		}
	}
}

func TestReceiveRefusesUntrustedManifests(t *testing.T) {
	for _, tc := range []struct {
		name string
		m    Manifest
	}{
		{"parent", Manifest{Format: 1, Files: []File{{Path: "../x", Mode: 0o600}}}},
		{"absolute", Manifest{Format: 1, Files: []File{{Path: "/etc/passwd", Mode: 0o600}}}},
		{"unclean", Manifest{Format: 1, Files: []File{{Path: "a//b", Mode: 0o600}}}},
		{"device", Manifest{Format: 1, Files: []File{{Path: "dev", Mode: 0o600 | os.ModeDevice}}}},
		{"symlink", Manifest{Format: 1, Files: []File{{Path: "l", Mode: 0o777 | os.ModeSymlink}}}},
		{"twice", Manifest{Format: 1, Files: []File{{Path: "a", Mode: 0o600}, {Path: "a", Mode: 0o600}}}},
		{"file and dir", Manifest{Format: 1, Files: []File{{Path: "a", Mode: 0o600}, {Path: "a/b", Mode: 0o600}}}},
		{"data beyond size", Manifest{Format: 1, Files: []File{{Path: "a", Size: 1, Data: 2, Mode: 0o600}}}},
		{"too large", Manifest{Format: 1, Files: []File{{Path: "a", Size: 5 << 40, Mode: 0o600}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.m.check(Limits{}); err == nil {
				t.Error("accepted")
			}
		})
	}
}

func TestSparseRoundTrip(t *testing.T) {
	src := filepath.Join(t.TempDir(), "sparse")
	f, _ := os.Create(src)
	f.WriteAt([]byte("head"), 0)
	f.WriteAt([]byte("tail"), 200<<20)
	f.Close()
	s, err := Plan("x", [16]byte{1}, []Source{{Path: "d/sparse", Src: src, Mode: 0o600}})
	if err != nil {
		t.Fatal(err)
	}
	if d := s.Manifest.DataBytes(); d >= 200<<20 {
		t.Errorf("a sparse file sends %d bytes: its holes were not skipped", d)
	}
	var buf bytes.Buffer
	if _, err := s.WriteTo(context.Background(), &buf); err != nil {
		t.Fatal(err)
	}
	got, err := Receive(context.Background(), &buf, t.TempDir(), Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(filepath.Join(got.Dir, "d", "sparse"))
	if !bytes.Equal(a, b) {
		t.Error("the received file differs")
	}
}

func TestCleanIncoming(t *testing.T) {
	parent := t.TempDir()
	held := filepath.Join(parent, stagingPrefix+"held")
	left := filepath.Join(parent, stagingPrefix+"left")
	other := filepath.Join(parent, "not-staging")
	for _, d := range []string{held, left, other} {
		if err := os.MkdirAll(filepath.Join(d, "tpm"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	l, err := lockDir(held, true)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if gone := CleanIncoming(parent); len(gone) != 1 || gone[0] != filepath.Base(left) {
		t.Errorf("removed %v, want only %s", gone, filepath.Base(left))
	}
	for _, d := range []string{held, other} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s: %v", d, err)
		}
	}
}

// TestOutsidePathsNeedTheDestinationsAllowList: a kernel outside the
// bundle stays a host path; the destination takes the VM only when its own
// allow list admits it.
func TestOutsidePathsNeedTheDestinationsAllowList(t *testing.T) {
	a, b := testHost(t), testHost(t)
	boot := t.TempDir()
	kernel, initrd := filepath.Join(boot, "vmlinuz"), filepath.Join(boot, "initrd.img")
	for _, f := range []string{kernel, initrd} {
		if err := os.WriteFile(f, []byte("boot file"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	res, err := a.Create(vm.CreateOptions{Name: "direct", OS: vm.Linux, NoDisk: true, Kernel: kernel, Initrd: initrd})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_, err = Send(ctx, a, res.VM, Local{Registry: b}, Options{Op: vm.OpCopy, To: "b"})
	var pna *vm.PathNotAllowedError
	if !errors.As(err, &pna) || pna.Path != kernel {
		t.Fatalf("a kernel b does not allow: %v; want refused in pre-flight", err)
	}
	if rs := errdefs.Remedies(err); len(rs) == 0 || rs[len(rs)-1].Action != errdefs.ActionHostAllowPath {
		t.Errorf("remedies %+v: want allow-path", rs)
	}
	if _, err := b.AllowPaths(boot); err != nil {
		t.Fatal(err)
	}
	if _, err := Send(ctx, a, res.VM, Local{Registry: b}, Options{Op: vm.OpCopy, To: "b"}); err != nil {
		t.Fatal(err)
	}
	v, err := b.Open("direct")
	if err != nil || v.Config.Kernel != kernel {
		t.Errorf("on b: %v, kernel %q", err, v.Config.Kernel)
	}
}

// lostAnswer is a destination whose answer to a stream is lost after it
// took the VM.
type lostAnswer struct{ Local }

func (d lostAnswer) Receive(ctx context.Context, req *Request, send func(io.Writer) error) (*Arrived, error) {
	if _, err := d.Local.Receive(ctx, req, send); err != nil {
		return nil, err
	}
	return nil, errdefs.New(errdefs.ErrUnavailable, "connection reset")
}

// TestMoveWhoseAnswerWasLost: the destination registered the VM but its
// answer never came; asked, it confirms, and the VM leaves this host
// rather than living on both.
func TestMoveWhoseAnswerWasLost(t *testing.T) {
	a, b := testHost(t), testHost(t)
	res, err := a.Create(vm.CreateOptions{Name: "lost", OS: vm.Linux, NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	got, err := Send(context.Background(), a, res.VM, lostAnswer{Local{Registry: b}}, Options{Op: vm.OpMove, To: "b"})
	if err != nil {
		t.Fatal(err)
	}
	if got.UUID != res.VM.Config.UUID.String() || len(got.Notes) == 0 || !strings.Contains(got.Notes[0], "answer was lost (connection reset)") {
		t.Errorf("result %+v", got)
	}
	if _, err := a.Open("lost"); !errors.Is(err, vm.ErrNotFound) {
		t.Errorf("the VM is still on a: %v", err)
	}
}
