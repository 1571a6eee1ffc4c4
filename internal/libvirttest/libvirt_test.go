package libvirttest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/hostcheck"
	"vtpm/internal/hostsvc"
	"vtpm/internal/qemutest"
	"vtpm/internal/state"
	"vtpm/internal/testutil"
)

// Objects the guest keeps in its TPM across restarts.
const (
	sealHandle = "0x81000007" // sealed to PCR 7
	nvIndex    = "0x1500016"
	ekCertRSA  = "0x1c00002" // written by swtpm_setup --create-ek-cert
)

// TestLibvirtDomainWithVTPM runs libvirt 9 unchanged, with vtpm found first
// in libvirtd's PATH as swtpm and swtpm_setup and the host service holding
// the keystore: libvirt manufactures a new TPM with vtpm's swtpm_setup (as
// tss) and serves it with vtpm's swtpm (as tss); the guest seals a secret
// to PCR 7 and writes an NV index; after a shutdown and a start the guest
// unseals and reads them back (libvirt did not manufacture the TPM again);
// the state libvirt keeps is sealed and owned by tss; `virsh undefine
// --nvram --keep-tpm` keeps the TPM for the domain defined again, and
// without --keep-tpm it goes with the domain, as with swtpm.
func TestLibvirtDomainWithVTPM(t *testing.T) {
	SkipIfUnavailable(t)
	qemutest.SkipIfUnavailable(t)
	tss, err := user.Lookup("tss")
	if err != nil {
		testutil.Missing(t, "no tss user (libvirt's swtpm_user; the tpm2-tools or swtpm packages create it): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	// libvirt's users must reach everything below dir: tss the binaries
	// and the host service's socket, QEMU the kernel, initrd and console.
	dir := qemutest.ShortTempDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	vtpm := testutil.Binary(t)
	bin := install(t, vtpm, filepath.Join(dir, "bin"))
	sock := startHostService(ctx, t, filepath.Join(bin, "vtpm"), filepath.Join(dir, "host"))
	d := Start(ctx, t, Config{BinDir: bin, Env: []string{hostsvc.SocketEnv + "=" + sock}})

	img, err := qemutest.BuildImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	code, vars := hostcheck.Firmware(true)
	guest := filepath.Join(dir, "guest")
	if err := os.Mkdir(guest, 0o755); err != nil {
		t.Fatal(err)
	}
	// Copies: libvirt hands the files it boots to its QEMU user.
	kernel, initrd := filepath.Join(guest, "vmlinuz"), filepath.Join(guest, "initrd.img")
	copyFile(t, img.Kernel, kernel)
	copyFile(t, img.Initrd, initrd)
	dom := Domain{
		Name:         "vtpm-libvirt-" + randomHex(4),
		UUID:         newUUID(),
		Loader:       code,
		VarsTemplate: vars,
		Kernel:       kernel,
		Initrd:       initrd,
		Cmdline:      "console=ttyS0 quiet rdinit=/init no_timer_check",
		SerialSocket: filepath.Join(guest, "serial.sock"),
	}
	tpmDir := TPMDir(dom.UUID)
	swtpmLog := filepath.Join(SwtpmLogDir, dom.Name+"-swtpm.log")
	define(ctx, t, d, dom)
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = d.Virsh(cctx, "destroy", dom.Name)
		_, _ = d.Virsh(cctx, "undefine", "--nvram", dom.Name)
		if t.Failed() {
			t.Logf("%s (swtpm_setup and swtpm) tail:\n%s", swtpmLog, Tail(swtpmLog, 40))
			qlog := filepath.Join("/var/log/libvirt/qemu", dom.Name+".log")
			t.Logf("%s tail:\n%s", qlog, Tail(qlog, 20))
		}
		os.Remove(swtpmLog)
		os.Remove(filepath.Join("/var/log/libvirt/qemu", dom.Name+".log"))
		os.RemoveAll(filepath.Join(SwtpmStorageDir, dom.UUID))
	})
	secret, nvData := "libvirt-secret-"+randomHex(8), "libvirt-nv-"+randomHex(8)

	// A new domain: libvirt makes the state directory and has swtpm_setup
	// manufacture the TPM in it.
	if _, err := os.Stat(tpmDir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("%s exists before the first start (%v)", tpmDir, err)
	}
	g := boot(ctx, t, d, dom)
	checkTPMProcess(t, tpmDir, filepath.Join(bin, "vtpm"), tss)
	ek := g.must(ctx, t, "tpmtest nvread "+ekCertRSA+" | sha256sum")
	g.must(ctx, t, "tpmtest seal "+sealHandle+" "+secret)
	g.must(ctx, t, "tpmtest nvwrite "+nvIndex+" "+nvData)
	powerOff(ctx, t, d, dom, g)
	checkSealed(t, tpmDir, tss, secret, nvData)

	// The directory exists: libvirt starts the TPM without swtpm_setup,
	// and it is the same TPM.
	g = boot(ctx, t, d, dom)
	checkGuestTPM(ctx, t, g, ek, secret, nvData)
	// A hard stop loses nothing either: every TPM write is durable.
	d.MustVirsh(ctx, t, "destroy", dom.Name)
	checkSealed(t, tpmDir, tss, secret, nvData)
	if n := strings.Count(readFile(t, swtpmLog), "Starting vTPM manufacturing"); n != 1 {
		t.Errorf("%s: swtpm_setup manufactured %d times over two starts, want once:\n%s", swtpmLog, n, Tail(swtpmLog, 40))
	}

	// undefine --keep-tpm keeps the TPM; the domain defined again gets it.
	nvram := filepath.Join("/var/lib/libvirt/qemu/nvram", dom.Name+"_VARS.fd")
	if _, err := os.Stat(nvram); err != nil {
		t.Errorf("the domain's UEFI variables: %v", err)
	}
	kept := stateNames(t, tpmDir)
	d.MustVirsh(ctx, t, "undefine", "--nvram", "--keep-tpm", dom.Name)
	if _, err := os.Stat(nvram); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("undefine --nvram left %s (%v)", nvram, err)
	}
	if got := stateNames(t, tpmDir); !slicesEqual(got, kept) {
		t.Errorf("undefine --keep-tpm: %s holds %v, want %v", tpmDir, got, kept)
	}
	define(ctx, t, d, dom)
	g = boot(ctx, t, d, dom)
	checkGuestTPM(ctx, t, g, ek, secret, nvData)
	d.MustVirsh(ctx, t, "destroy", dom.Name)

	// Without --keep-tpm the TPM goes with the domain.
	d.MustVirsh(ctx, t, "undefine", "--nvram", dom.Name)
	if _, err := os.Stat(filepath.Join(SwtpmStorageDir, dom.UUID)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("undefine --nvram left the TPM in %s (%v)", filepath.Join(SwtpmStorageDir, dom.UUID), err)
	}
	if n := strings.Count(readFile(t, swtpmLog), "Starting vTPM manufacturing"); n != 1 {
		t.Errorf("%s: swtpm_setup manufactured %d times, want once:\n%s", swtpmLog, n, Tail(swtpmLog, 40))
	}
}

// install puts vtpm where libvirt's tss can run it, beside its swtpm and
// swtpm_setup names, and returns the directory.
func install(t *testing.T, vtpm, dir string) string {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// `vtpm host serve` is vtpm-hostd's, found beside vtpm.
	for name, src := range map[string]string{"vtpm": vtpm, "vtpm-hostd": testutil.HostdBinary(t)} {
		copyFile(t, src, filepath.Join(dir, name))
		if err := os.Chmod(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"swtpm", "swtpm_setup"} {
		if err := os.Symlink("vtpm", filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// startHostService runs `vtpm host serve` in the foreground with its own
// data root below dir and returns its socket, which tss can reach.
func startHostService(ctx context.Context, t *testing.T, vtpm, dir string) string {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "host.sock")
	cmd := exec.CommandContext(ctx, vtpm, "host", "serve", "--socket", sock, "--data-root", filepath.Join(dir, "data"))
	cmd.Env = append(os.Environ(), "VTPM_HOST_TPM=none")
	p := testutil.StartCmd(t, cmd, "")
	if err := p.WaitReady(sock, 30*time.Second); err != nil {
		t.Fatalf("vtpm host serve: %v\n%s", err, p.Stderr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("vtpm host serve output:\n%s", p.Stderr)
		}
	})
	return sock
}

// define defines dom from its XML.
func define(ctx context.Context, t *testing.T, d *Daemon, dom Domain) {
	t.Helper()
	x, err := dom.XML()
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), dom.Name+".xml")
	if err := os.WriteFile(f, []byte(x), 0o644); err != nil {
		t.Fatal(err)
	}
	d.MustVirsh(ctx, t, "define", f)
}

// guestConsole is the command channel of a booted domain.
type guestConsole struct {
	*qemutest.Serial
	name string
}

// boot starts the domain and waits for the guest's command loop.
func boot(ctx context.Context, t *testing.T, d *Daemon, dom Domain) *guestConsole {
	t.Helper()
	began := time.Now()
	// libvirt 9.0 gives the TPM process one second from its start to
	// create its control socket (qemuTPMEmulatorStart); the vTPM makes it
	// before it opens its key through the host service.
	d.MustVirsh(ctx, t, "start", dom.Name)
	bctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	s, err := qemutest.DialSerial(bctx, dom.SerialSocket)
	if err != nil {
		t.Fatalf("%s: %v", dom.Name, err)
	}
	t.Cleanup(func() { s.Close() })
	t.Logf("%s: guest ready %v after virsh start", dom.Name, time.Since(began).Round(100*time.Millisecond))
	return &guestConsole{Serial: s, name: dom.Name}
}

func (g *guestConsole) must(ctx context.Context, t *testing.T, command string) string {
	t.Helper()
	out, err := g.Run(ctx, command)
	if err != nil {
		t.Fatalf("%s: %v", g.name, err)
	}
	return strings.TrimSpace(out)
}

// powerOff shuts the guest down from inside and waits until libvirt has
// stopped the domain (and with it the TPM). The test guest has no ACPI
// button driver (its kernel has no modules), so `virsh shutdown` would go
// unanswered; the guest powers off as an OS does when asked to.
func powerOff(ctx context.Context, t *testing.T, d *Daemon, dom Domain, g *guestConsole) {
	t.Helper()
	g.must(ctx, t, "sync; (sleep 1; poweroff -f) >/dev/null 2>&1 </dev/null &")
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := d.WaitDomState(sctx, dom.Name, "shut off"); err != nil {
		t.Fatal(err)
	}
	g.Close()
}

// checkTPMProcess checks that the TPM libvirt started for the state
// directory is vtpm, running as tss.
func checkTPMProcess(t *testing.T, dir, vtpm string, tss *user.User) {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	found := 0
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte("dir="+dir+",")) {
			continue
		}
		found++
		pdir := filepath.Dir(p)
		if exe, err := os.Readlink(filepath.Join(pdir, "exe")); err != nil || exe != vtpm {
			t.Errorf("the TPM process %s runs %q (%v), want %s", pdir, exe, err, vtpm)
		}
		st, err := os.Stat(pdir)
		if err != nil {
			t.Error(err)
			continue
		}
		if uid := st.Sys().(*syscall.Stat_t).Uid; strconv.Itoa(int(uid)) != tss.Uid {
			t.Errorf("the TPM process %s runs as uid %d, want %s (tss)", pdir, uid, tss.Uid)
		}
	}
	if found != 1 {
		t.Errorf("%d processes serve %s, want 1", found, dir)
	}
}

// checkGuestTPM checks that the guest has the TPM it had before: the EK
// certificate swtpm_setup wrote, the sealed secret and the NV index.
func checkGuestTPM(ctx context.Context, t *testing.T, g *guestConsole, ek, secret, nvData string) {
	t.Helper()
	if got := g.must(ctx, t, "tpmtest nvread "+ekCertRSA+" | sha256sum"); got != ek {
		t.Errorf("EK certificate digest %q, want %q: the TPM was manufactured again", got, ek)
	}
	if got := g.must(ctx, t, "tpmtest unseal "+sealHandle); got != secret {
		t.Errorf("unsealed %q, want %q", got, secret)
	}
	if got := g.must(ctx, t, "tpmtest nvread "+nvIndex); got != nvData {
		t.Errorf("NV index %s holds %q, want %q", nvIndex, got, nvData)
	}
}

// checkSealed checks the state libvirt keeps for the domain: vtpm's sealed
// state (not swtpm's plaintext files), with neither the secret nor the NV
// data readable in any file, and every entry owned by tss.
func checkSealed(t *testing.T, dir string, tss *user.User, secrets ...string) {
	t.Helper()
	if out, err := exec.Command("ls", "-ln", dir).CombinedOutput(); err == nil {
		t.Logf("ls -ln %s:\n%s", dir, out)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(tss.Uid)
	names := []string{"."}
	blobs := 0
	for _, e := range entries {
		names = append(names, e.Name())
		if state.IsSealedBlob(e.Name()) {
			blobs++
		}
	}
	if blobs == 0 {
		t.Errorf("%s holds no sealed blob: %v", dir, names)
	}
	for _, must := range []string{state.IdentityFile, state.ProtectorFile} {
		if _, err := os.Stat(filepath.Join(dir, must)); err != nil {
			t.Errorf("sealed state without %s: %v", must, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, state.SwtpmFile("permall"))); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s holds swtpm's %s (%v)", dir, state.SwtpmFile("permall"), err)
	}
	for _, name := range names {
		p := filepath.Join(dir, name)
		st, err := os.Lstat(p)
		if err != nil {
			t.Error(err)
			continue
		}
		if owner := st.Sys().(*syscall.Stat_t).Uid; int(owner) != uid {
			t.Errorf("%s is owned by uid %d, want %d (tss)", p, owner, uid)
		}
		if !st.Mode().IsRegular() {
			continue
		}
		b := readFile(t, p)
		for _, s := range secrets {
			if strings.Contains(b, s) {
				t.Errorf("%s holds %q in clear", p, s)
			}
		}
	}
}

// stateNames lists the TPM state files of a directory.
func stateNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if state.IsStateFile(e.Name()) {
			names = append(names, e.Name())
		}
	}
	return names
}

func slicesEqual(a, b []string) bool {
	return strings.Join(a, "\x00") == strings.Join(b, "\x00")
}

func readFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func newUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return fmt.Sprintf("%s-%s-%s-%s-%s", h[0:8], h[8:12], h[12:16], h[16:20], h[20:32])
}
