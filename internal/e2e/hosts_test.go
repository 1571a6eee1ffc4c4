package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/keyfile"
	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// Hosts on one machine: each simulated host is a data root of its own
// ($VTPM_HOME), so it has its own keystore, guardian and generation records.
// TPM state moves between hosts by copying its directory, as copying a VM
// bundle does. The vTPMs run as `vtpm swtpm socket` processes driven with
// swtpm_ioctl and tpm2-tools over the swtpm TCTI.

type vhost struct {
	name string
	home string
	env  []string // more environment, e.g. VTPM_HOST_TPM
}

func newVHost(t *testing.T, name string, env ...string) *vhost {
	t.Helper()
	testutil.Need(t, "swtpm_ioctl", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread", "tpm2_createprimary")
	// File protection unless a test names a host TPM: never this machine's own TPM.
	return &vhost{name: name, home: filepath.Join(t.TempDir(), name), env: append([]string{"VTPM_HOST_TPM=none"}, env...)}
}

func (h *vhost) environ() []string { return append([]string{"VTPM_HOME=" + h.home}, h.env...) }

// vtpm runs a vtpm command on h that must succeed.
func (h *vhost) vtpm(t *testing.T, args ...string) string {
	t.Helper()
	return testutil.Run(t, h.environ(), testutil.Binary(t), args...)
}

// vtpmFails runs a vtpm command on h that must fail, and returns its output.
func (h *vhost) vtpmFails(t *testing.T, args ...string) string {
	t.Helper()
	out, err := testutil.RunErr(h.environ(), testutil.Binary(t), args...)
	if err == nil {
		t.Fatalf("host %s: vtpm %s succeeded; want an error:\n%s", h.name, strings.Join(args, " "), out)
	}
	return out
}

// fingerprint is the fingerprint of h's own guardian.
func (h *vhost) fingerprint(t *testing.T) string {
	t.Helper()
	var g struct{ Fingerprint string }
	if err := json.Unmarshal([]byte(h.vtpm(t, "guardian", "show", "--json")), &g); err != nil || len(g.Fingerprint) != 64 {
		t.Fatalf("guardian show --json: %v", err)
	}
	return g.Fingerprint
}

// keystore maps the files of h's keystore to their contents.
func (h *vhost) keystore(t *testing.T) map[string][]byte {
	t.Helper()
	return treeFiles(t, filepath.Join(h.home, "keystore"))
}

// treeFiles maps every regular file under dir (relative path) to its contents.
func treeFiles(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		files[rel] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// stateFiles maps the regular files directly in a state directory (not its
// lock) to their contents.
func stateFiles(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for name, b := range treeFiles(t, dir) {
		if !strings.Contains(name, "/") && name != ".lock" {
			files[name] = b
		}
	}
	return files
}

func equalFiles(a, b map[string][]byte) bool { return maps.EqualFunc(a, b, bytes.Equal) }

// copyFiles writes files into dir (created if needed).
func copyFiles(t *testing.T, files map[string][]byte, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// copyFile copies one file of a state directory into another.
func copyFile(t *testing.T, name, from, to string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(from, name))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(to, name), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func writeText(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func mustContain(t *testing.T, what, out string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Errorf("%s lacks %q:\n%s", what, w, out)
		}
	}
}

// hostTPM is a running vTPM: data on a unix socket, control beside it (as
// the swtpm TCTI expects), started and initialised (not-need-init).
type hostTPM struct {
	*testutil.Proc
	sock string
}

func (h *vhost) tpmArgs(sock, dir string, extra []string) []string {
	return append([]string{"--tpm2", "--tpmstate", "dir=" + dir,
		"--server", "type=unixio,path=" + sock, "--ctrl", "type=unixio,path=" + sock + ".ctrl",
		"--flags", "not-need-init,startup-clear"}, extra...)
}

// start runs a vTPM on h for the state in dir.
func (h *vhost) start(t *testing.T, dir string, extra ...string) *hostTPM {
	t.Helper()
	sock := filepath.Join(qemutest.ShortTempDir(t), "tpm")
	p := testutil.Start(t, testutil.Binary(t), h.environ(), sock, h.tpmArgs(sock, dir, extra)...)
	if err := p.WaitReady(sock+".ctrl", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	return &hostTPM{Proc: p, sock: sock}
}

// refuse runs a vTPM on h for the state in dir that must exit with status 1
// without leaving sockets, and returns what it printed.
func (h *vhost) refuse(t *testing.T, dir string, extra ...string) string {
	t.Helper()
	sock := filepath.Join(qemutest.ShortTempDir(t), "tpm")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, testutil.Binary(t), append([]string{"swtpm", "socket"}, h.tpmArgs(sock, dir, extra)...)...)
	cmd.Env = append(os.Environ(), h.environ()...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("host %s: vTPM on %s: %v; want it to refuse with exit status 1:\n%s", h.name, dir, err, out)
	}
	for _, s := range []string{sock, sock + ".ctrl"} {
		if _, err := os.Stat(s); err == nil {
			t.Errorf("the refused vTPM left %s behind", s)
		}
	}
	return string(out)
}

func (p *hostTPM) tpm2(t *testing.T, tool string, args ...string) string {
	t.Helper()
	return testutil.Run(t, nil, tool, append([]string{"-T", "swtpm:path=" + p.sock}, args...)...)
}

// stop shuts the vTPM down as QEMU does (CMD_SHUTDOWN) and waits for it.
func (p *hostTPM) stop(t *testing.T) {
	t.Helper()
	testutil.Run(t, nil, "swtpm_ioctl", "--unix", p.sock+".ctrl", "-s")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("vTPM did not exit cleanly: %v\n%s", err, p.Stderr)
	}
}

const (
	hostsNV     = "0x1500017"
	hostsNVSize = 32
)

// nvValue pads s to the NV index's size.
func nvValue(s string) []byte {
	b := make([]byte, hostsNVSize)
	copy(b, s)
	return b
}

func (p *hostTPM) nvDefine(t *testing.T) {
	t.Helper()
	p.tpm2(t, "tpm2_nvdefine", hostsNV, "-C", "o", "-s", strconv.Itoa(hostsNVSize), "-a", "ownerread|ownerwrite")
}

func (p *hostTPM) nvWrite(t *testing.T, s string) {
	t.Helper()
	in := writeText(t, t.TempDir(), "nv", string(nvValue(s)))
	p.tpm2(t, "tpm2_nvwrite", hostsNV, "-C", "o", "-i", in)
}

func (p *hostTPM) nvRead(t *testing.T) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "nv")
	p.tpm2(t, "tpm2_nvread", hostsNV, "-C", "o", "-s", strconv.Itoa(hostsNVSize), "-o", out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var eccPointRE = regexp.MustCompile(`(?m)^([xy]): ([0-9a-f]+)$`)

// ekPublic returns the public point of the ECC P-256 primary key of the
// endorsement hierarchy: it derives from the TPM's endorsement seed, so it
// is the same on every start of one TPM and differs between TPMs.
func (p *hostTPM) ekPublic(t *testing.T) string {
	t.Helper()
	out := p.tpm2(t, "tpm2_createprimary", "-C", "e", "-G", "ecc", "-c", filepath.Join(t.TempDir(), "ek.ctx"))
	m := eccPointRE.FindAllStringSubmatch(out, -1)
	if len(m) != 2 || m[0][1] != "x" || m[1][1] != "y" {
		t.Fatalf("no ECC point in tpm2_createprimary output:\n%s", out)
	}
	return m[0][2] + ":" + m[1][2]
}

// newHostTPM runs a new TPM on h in a fresh directory, writes value into
// an NV index, and stops it. It returns the directory.
func newHostTPM(t *testing.T, h *vhost, value string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), h.name+"-tpm")
	p := h.start(t, dir)
	p.nvDefine(t)
	p.nvWrite(t, value)
	p.stop(t)
	return dir
}

// checkGuardianError checks the message of a vTPM that no guardian on the
// host can open: it names the TPM's directory, lists the guardians the
// protector admits (and only those) apart from the ones the host holds,
// and the ways out.
func checkGuardianError(t *testing.T, out, dir string, admitted, held []string) {
	t.Helper()
	mustContain(t, "the refusal", out, "cannot be opened on this host", dir, "Ways out", "vtpm guardian import", "vtpm protector grant", "vtpm key import", "--on-missing-key reprovision")
	admits, holds, ok := strings.Cut(out, "This host holds:")
	if !ok {
		t.Fatalf("the refusal does not list the guardians this host holds:\n%s", out)
	}
	_, admits, _ = strings.Cut(admits, "admits:")
	holds, _, _ = strings.Cut(holds, "Ways out")
	for _, fp := range admitted {
		if !strings.Contains(admits, "fingerprint "+fp) {
			t.Errorf("the refusal does not list guardian %s as admitted:\n%s", fp, out)
		}
	}
	if n := strings.Count(admits, "fingerprint "); n != len(admitted) {
		t.Errorf("the refusal lists %d admitted guardians; want %d:\n%s", n, len(admitted), out)
	}
	for _, fp := range held {
		if !strings.Contains(holds, "fingerprint "+fp) {
			t.Errorf("the refusal does not list guardian %s as held here:\n%s", fp, out)
		}
	}
}

// TestHostsGuardianTransfer moves a TPM from host A to host B and gives B
// access, then takes it away, step by step: each step either starts the
// TPM on B, which serves the NV value written on A, or is refused with the
// guardian-listing error, or, while B does not trust A as the TPM's owner,
// with the error saying so.
func TestHostsGuardianTransfer(t *testing.T) {
	t.Parallel()
	a, b := newVHost(t, "a"), newVHost(t, "b")
	const written = "written on host A"
	dirA := newHostTPM(t, a, written)
	dirB := filepath.Join(t.TempDir(), "b-tpm")
	copyFiles(t, stateFiles(t, dirA), dirB)
	fpA, fpB := a.fingerprint(t), b.fingerprint(t)
	files := t.TempDir()
	pw := writeText(t, files, "pw", "guardian transfer password\n")

	steps := []struct {
		name      string
		do        func(t *testing.T)
		opens     bool
		admitted  []string // when refused
		held      []string
		untrusted bool // refused because B does not trust the owner, A
	}{
		{
			name:     "copied to B",
			do:       func(*testing.T) {},
			admitted: []string{fpA}, held: []string{fpB},
		},
		{
			name: "A's guardian exported and imported on B",
			do: func(t *testing.T) {
				p12 := filepath.Join(files, "a.p12")
				a.vtpm(t, "guardian", "export", fpA, "-o", p12, "--password-file", pw)
				mustContain(t, "guardian import", b.vtpm(t, "guardian", "import", p12, "--password-file", pw), fpA)
			},
			opens: true,
		},
		{
			name:     "A's guardian removed from B",
			do:       func(t *testing.T) { b.vtpm(t, "guardian", "remove", fpA) },
			admitted: []string{fpA}, held: []string{fpB},
		},
		{
			name: "B granted on A by its certificates alone",
			do: func(t *testing.T) {
				pem := filepath.Join(files, "b.pem")
				b.vtpm(t, "guardian", "export", "--certs-only", "-o", pem)
				a.vtpm(t, "protector", "grant", dirA, pem)
				copyFile(t, "protector.json", dirA, dirB)
			},
			untrusted: true,
		},
		{
			name: "A trusted on B by its certificates",
			do: func(t *testing.T) {
				pem := filepath.Join(files, "a.pem")
				a.vtpm(t, "guardian", "export", "--certs-only", "-o", pem)
				mustContain(t, "guardian trust", b.vtpm(t, "guardian", "trust", pem), fpA)
			},
			opens: true,
		},
		{
			name: "B's guardian revoked on A",
			do: func(t *testing.T) {
				a.vtpm(t, "protector", "revoke", dirA, fpB)
				copyFile(t, "protector.json", dirA, dirB)
			},
			admitted: []string{fpA}, held: []string{fpB},
		},
	}
	for _, s := range steps {
		ok := t.Run(s.name, func(t *testing.T) {
			s.do(t)
			if s.untrusted {
				before := stateFiles(t, dirB)
				mustContain(t, "the refusal", b.refuse(t, dirB), dirB, "neither holds nor trusts", fpA, "vtpm guardian trust")
				if !equalFiles(stateFiles(t, dirB), before) {
					t.Error("the refused start changed the state directory")
				}
				return
			}
			if !s.opens {
				before := stateFiles(t, dirB)
				checkGuardianError(t, b.refuse(t, dirB), dirB, s.admitted, s.held)
				if !equalFiles(stateFiles(t, dirB), before) {
					t.Error("the refused start changed the state directory")
				}
				return
			}
			p := b.start(t, dirB)
			if got := p.nvRead(t); !bytes.Equal(got, nvValue(written)) {
				t.Errorf("B reads NV %q; want %q, written on A", got, written)
			}
			p.stop(t)
		})
		if !ok {
			break
		}
	}
}

// TestHostsKeyExportImport moves a TPM to B by its exported key: failed
// imports (wrong passphrase, tampered or foreign files, a conflicting key)
// say why and leave B's keystore as it was; a good one lets B start the
// TPM; --replace replaces the key.
func TestHostsKeyExportImport(t *testing.T) {
	t.Parallel()
	a, b := newVHost(t, "a"), newVHost(t, "b")
	const written = "exported with its key"
	dirA := newHostTPM(t, a, written)
	dirB := filepath.Join(t.TempDir(), "b-tpm")
	copyFiles(t, stateFiles(t, dirA), dirB)
	b.fingerprint(t) // B exists before anything is imported into it
	files := t.TempDir()
	pp := writeText(t, files, "pp", "key export passphrase\n")
	wrongPP := writeText(t, files, "wrong", "not the passphrase\n")
	keyFile := filepath.Join(files, "tpm.key")
	mustContain(t, "key export", a.vtpm(t, "key", "export", dirA, "-o", keyFile, "--passphrase-file", pp), "exported the key")
	good, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	var state struct{ UUID uuid.UUID }
	if sf, err := os.ReadFile(filepath.Join(dirA, "vtpm-state.json")); err != nil || json.Unmarshal(sf, &state) != nil {
		t.Fatalf("vtpm-state.json: %v", err)
	}
	variant := func(name string, edit func([]byte) []byte) string {
		return writeText(t, files, name, string(edit(bytes.Clone(good))))
	}
	flip := func(off int) func([]byte) []byte {
		return func(b []byte) []byte { b[off] ^= 0x40; return b }
	}
	// Another copy of the TPM (same UUID) with a key of its own, as a
	// second host that provisioned the same bundle would export.
	otherDEK := make([]byte, 32)
	rand.Read(otherDEK)
	other, err := keyfile.Encrypt(keyfile.Key{TPM: state.UUID, DEK: otherDEK}, "key export passphrase", &keyfile.Params{Time: 1, Memory: 8 << 10, Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	otherFile := writeText(t, files, "other.key", string(other))

	failures := []struct {
		name, file, pp string
		before         func(t *testing.T) // on B
		want           []string
	}{
		{name: "wrong passphrase", file: keyFile, pp: wrongPP, want: []string{"tpm.key", "wrong passphrase"}},
		{name: "tampered salt", file: variant("salt.key", flip(25)), pp: pp, want: []string{"salt.key", "wrong passphrase, or the file was modified"}},
		{name: "tampered cost", file: variant("cost.key", flip(11)), pp: pp, want: []string{"cost.key", "keyfile"}},
		{name: "tampered ciphertext", file: variant("ct.key", flip(60)), pp: pp, want: []string{"ct.key", "wrong passphrase, or the file was modified"}},
		{name: "tampered tag", file: variant("tag.key", flip(len(good)-1)), pp: pp, want: []string{"tag.key", "wrong passphrase, or the file was modified"}},
		{name: "truncated", file: variant("short.key", func(b []byte) []byte { return b[:100] }), pp: pp, want: []string{"short.key", "truncated"}},
		{name: "not a key file", file: writeText(t, files, "pw.txt", strings.Repeat("x", len(good))), pp: pp, want: []string{"pw.txt", "not a vtpm key file"}},
		{
			name: "a different key for the same TPM already imported", file: otherFile, pp: pp,
			before: func(t *testing.T) { b.vtpm(t, "key", "import", keyFile, "--passphrase-file", pp) },
			want:   []string{"different key", state.UUID.String(), "--replace"},
		},
	}
	for _, f := range failures {
		t.Run(f.name, func(t *testing.T) {
			if f.before != nil {
				f.before(t)
			}
			ks := b.keystore(t)
			mustContain(t, "the failed import", b.vtpmFails(t, "key", "import", f.file, "--passphrase-file", f.pp), f.want...)
			if !equalFiles(b.keystore(t), ks) {
				t.Error("the failed import changed B's keystore")
			}
		})
	}

	t.Run("imported key starts the TPM on B", func(t *testing.T) {
		b.vtpm(t, "key", "import", keyFile, "--passphrase-file", pp) // again: the same key is no conflict
		p := b.start(t, dirB)
		if got := p.nvRead(t); !bytes.Equal(got, nvValue(written)) {
			t.Errorf("B reads NV %q; want %q", got, written)
		}
		p.stop(t)
	})
	t.Run("--replace", func(t *testing.T) {
		mustContain(t, "key import --replace", b.vtpm(t, "key", "import", otherFile, "--passphrase-file", pp, "--replace"), state.UUID.String())
		// The other copy's key is not this TPM's: B says so rather than
		// failing to decrypt the state.
		out := b.refuse(t, dirB)
		mustContain(t, "the refusal", out, "cannot be opened on this host", "imported", "--replace")
		b.vtpm(t, "key", "import", keyFile, "--passphrase-file", pp, "--replace")
		p := b.start(t, dirB)
		if got := p.nvRead(t); !bytes.Equal(got, nvValue(written)) {
			t.Errorf("B reads NV %q after replacing the key back; want %q", got, written)
		}
		p.stop(t)
	})
}

// TestHostsReprovision starts on B a TPM that B cannot open, with the policy
// on-missing-key=reprovision: the old state goes, byte for byte, into a
// backup directory beside it, the process warns loudly, and the TPM is a
// new one (another endorsement key).
func TestHostsReprovision(t *testing.T) {
	t.Parallel()
	a, b := newVHost(t, "a"), newVHost(t, "b")
	dirA := filepath.Join(t.TempDir(), "a-tpm")
	p := a.start(t, dirA)
	p.nvDefine(t)
	p.nvWrite(t, "old TPM")
	oldEK := p.ekPublic(t)
	p.stop(t)
	p = a.start(t, dirA)
	if ek := p.ekPublic(t); ek != oldEK {
		t.Fatalf("the EK of one TPM changed across a restart (%s, then %s): the comparison below means nothing", oldEK, ek)
	}
	p.stop(t)

	dirB := filepath.Join(t.TempDir(), "b-tpm")
	old := stateFiles(t, dirA)
	copyFiles(t, old, dirB)
	// The default policy refuses and moves nothing.
	b.refuse(t, dirB)
	if !equalFiles(stateFiles(t, dirB), old) {
		t.Fatal("a refused start changed the state directory")
	}
	mustContain(t, "tpm policy", b.vtpm(t, "tpm", "policy", dirB, "--on-missing-key", "reprovision"), "reprovision")

	p = b.start(t, dirB)
	newEK := p.ekPublic(t)
	if _, err := testutil.RunErr(nil, "tpm2_nvread", "-T", "swtpm:path="+p.sock, hostsNV, "-C", "o"); err == nil {
		t.Error("the reprovisioned TPM still has the old TPM's NV index")
	}
	p.stop(t)
	backups, _ := filepath.Glob(filepath.Join(dirB, "backup-*"))
	if len(backups) != 1 {
		t.Fatalf("backups in %s: %v; want one", dirB, backups)
	}
	mustContain(t, "the reprovisioning vTPM's output", p.Stderr.String(), "WARNING", "FRESH TPM", backups[0])
	if newEK == oldEK {
		t.Errorf("the reprovisioned TPM has the old TPM's EK %s", oldEK)
	}
	if !regexp.MustCompile(`^backup-\d{8}T\d{6}Z$`).MatchString(filepath.Base(backups[0])) {
		t.Errorf("backup directory %s is not named backup-<timestamp>", backups[0])
	}
	if got := stateFiles(t, backups[0]); !equalFiles(got, old) {
		t.Errorf("the backup holds %v; want the old files %v, byte for byte", slicesKeys(got), slicesKeys(old))
	}
	now := stateFiles(t, dirB)
	if bytes.Equal(now["vtpm-state.json"], old["vtpm-state.json"]) || bytes.Equal(now["protector.json"], old["protector.json"]) {
		t.Error("the fresh TPM kept the old TPM's identity or protector")
	}

	// It is B's TPM now: the next start opens it, with no new backup or warning.
	p = b.start(t, dirB)
	if ek := p.ekPublic(t); ek != newEK {
		t.Errorf("the fresh TPM's EK changed on restart")
	}
	p.stop(t)
	if again, _ := filepath.Glob(filepath.Join(dirB, "backup-*")); len(again) != 1 {
		t.Errorf("backups after a restart: %v; want still one", again)
	}
	if strings.Contains(p.Stderr.String(), "WARNING") {
		t.Errorf("the restart warned:\n%s", p.Stderr)
	}
}

func slicesKeys(m map[string][]byte) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	return s
}

// TestHostsEditedProtector edits a protector by hand; the owner's own host
// refuses to start the TPM, naming protector.json.
func TestHostsEditedProtector(t *testing.T) {
	t.Parallel()
	a, b := newVHost(t, "a"), newVHost(t, "b")
	dir := newHostTPM(t, a, "protector edits")
	oneRow, err := os.ReadFile(filepath.Join(dir, "protector.json"))
	if err != nil {
		t.Fatal(err)
	}
	pem := filepath.Join(t.TempDir(), "b.pem")
	b.vtpm(t, "guardian", "export", "--certs-only", "-o", pem)
	a.vtpm(t, "protector", "grant", dir, pem)
	twoRows, err := os.ReadFile(filepath.Join(dir, "protector.json"))
	if err != nil {
		t.Fatal(err)
	}
	decode := func(b []byte) map[string]any {
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	rowsOf := func(m map[string]any) []any { return m["rows"].([]any) }
	tests := []struct {
		name string
		edit func() map[string]any
	}{
		{"row removed", func() map[string]any {
			m := decode(twoRows)
			m["rows"] = rowsOf(m)[:1]
			return m
		}},
		{"row added", func() map[string]any {
			m := decode(oneRow)
			m["rows"] = append(rowsOf(m), rowsOf(decode(twoRows))[1])
			return m
		}},
		{"signature changed", func() map[string]any {
			m := decode(twoRows)
			sig, err := base64.StdEncoding.DecodeString(m["signature"].(string))
			if err != nil {
				t.Fatal(err)
			}
			sig[len(sig)/2] ^= 0x01
			m["signature"] = base64.StdEncoding.EncodeToString(sig)
			return m
		}},
		{"owner's row removed", func() map[string]any {
			m := decode(twoRows)
			m["rows"] = rowsOf(m)[1:]
			return m
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			edited, err := json.MarshalIndent(tc.edit(), "", "\t")
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(edited, twoRows) || bytes.Equal(edited, oneRow) {
				t.Fatal("the edit changed nothing")
			}
			copyDir := filepath.Join(t.TempDir(), "tpm")
			copyFiles(t, stateFiles(t, dir), copyDir)
			path := filepath.Join(copyDir, "protector.json")
			if err := os.WriteFile(path, edited, 0o600); err != nil {
				t.Fatal(err)
			}
			out := a.refuse(t, copyDir)
			mustContain(t, "the refusal", out, path, "rejected", "modified outside vtpm")
			if got, _ := os.ReadFile(path); !bytes.Equal(got, edited) {
				t.Error("the refused start rewrote protector.json")
			}
		})
	}
	t.Run("unedited", func(t *testing.T) {
		t.Parallel()
		copyDir := filepath.Join(t.TempDir(), "tpm")
		copyFiles(t, stateFiles(t, dir), copyDir)
		a.start(t, copyDir).stop(t)
	})
}

// standInTPM is a swtpm standing in for a host's hardware TPM, on TCP.
type standInTPM struct {
	port  int
	state string
	proc  *testutil.Proc
}

func (s *standInTPM) spec() string { return fmt.Sprintf("tcp:127.0.0.1:%d", s.port) }

func (s *standInTPM) start(t *testing.T) {
	t.Helper()
	s.proc = testutil.Start(t, "swtpm", nil, fmt.Sprintf("127.0.0.1:%d", s.port),
		"--tpm2", "--server", fmt.Sprintf("type=tcp,port=%d", s.port), "--ctrl", fmt.Sprintf("type=tcp,port=%d", s.port+1),
		"--flags", "not-need-init,startup-clear", "--tpmstate", "dir="+s.state)
}

// TestHostsKeystoreSealedToHostTPM seals a host's keystore to a host TPM (a
// swtpm on TCP): the vTPM starts through it, and after the host TPM is
// replaced (a factory-fresh TPM on the same port) or gone, it refuses with
// the reason.
func TestHostsKeystoreSealedToHostTPM(t *testing.T) {
	t.Parallel()
	testutil.Need(t, "swtpm")
	hw := &standInTPM{port: testutil.FreePorts(t, 2), state: t.TempDir()}
	hw.start(t)
	h := newVHost(t, "c", "VTPM_HOST_TPM="+hw.spec())
	const written = "keystore sealed to the host TPM"
	dir := newHostTPM(t, h, written)
	ks := h.keystore(t)
	if _, ok := ks["master.tpm"]; !ok {
		t.Fatalf("keystore files %v; want master.tpm (sealed to the host TPM)", slicesKeys(ks))
	}
	if _, ok := ks["master.key"]; ok {
		t.Fatal("a keystore sealed to the host TPM also has a plain master.key")
	}
	for _, spec := range []string{hw.spec(), ""} { // "" (auto) uses the TPM it was sealed through
		hs := &vhost{name: h.name, home: h.home, env: []string{"VTPM_HOST_TPM=" + spec}}
		p := hs.start(t, dir)
		if got := p.nvRead(t); !bytes.Equal(got, nvValue(written)) {
			t.Errorf("VTPM_HOST_TPM=%q: NV %q; want %q", spec, got, written)
		}
		p.stop(t)
	}

	// A factory-fresh host TPM: new seeds, so a new storage root key.
	hw.proc.Kill()
	if err := os.RemoveAll(hw.state); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(hw.state, 0o700); err != nil {
		t.Fatal(err)
	}
	hw.start(t)
	for _, spec := range []string{hw.spec(), ""} {
		hs := &vhost{name: h.name, home: h.home, env: []string{"VTPM_HOST_TPM=" + spec}}
		before := hs.keystore(t)
		out := hs.refuse(t, dir)
		mustContain(t, fmt.Sprintf("the refusal (VTPM_HOST_TPM=%q)", spec), out,
			"master.tpm", "sealed to a different TPM", "cleared or replaced", hw.spec())
		if !equalFiles(hs.keystore(t), before) {
			t.Errorf("VTPM_HOST_TPM=%q: the refused start changed the keystore", spec)
		}
	}

	hw.proc.Kill()
	mustContain(t, "the refusal (host TPM gone)", h.refuse(t, dir), "no host TPM listening", fmt.Sprintf("127.0.0.1:%d", hw.port))
}

// TestHostsRollback puts an older copy of a TPM's state back: the vTPM
// refuses it with the rollback message, and serves it with --allow-rollback.
func TestHostsRollback(t *testing.T) {
	t.Parallel()
	a := newVHost(t, "a")
	dir := newHostTPM(t, a, "first")
	old := stateFiles(t, dir)
	p := a.start(t, dir)
	p.nvWrite(t, "second")
	p.nvWrite(t, "third")
	p.stop(t)
	newer := stateFiles(t, dir)
	if equalFiles(newer, old) {
		t.Fatal("writing NV did not change the state files")
	}
	for _, tc := range []struct {
		name    string
		restore func(t *testing.T)
		want    []string // NV values the restored copy may hold
	}{
		{
			name: "directory replaced by the old copy",
			restore: func(t *testing.T) {
				if err := os.RemoveAll(dir); err != nil {
					t.Fatal(err)
				}
				copyFiles(t, old, dir)
			},
			want: []string{"first"},
		},
		{
			// Files that only the newer state has stay: the vTPM reads the
			// newest copy there is, which is still older than the last seen.
			name:    "old files copied over the newer ones",
			restore: func(t *testing.T) { copyFiles(t, old, dir) },
			want:    []string{"first", "second"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.RemoveAll(dir); err != nil {
				t.Fatal(err)
			}
			copyFiles(t, newer, dir)
			tc.restore(t)
			out := a.refuse(t, dir)
			mustContain(t, "the refusal", out, "rollback", "older copy", "--allow-rollback")
			p := a.start(t, dir, "--allow-rollback")
			got := p.nvRead(t)
			p.stop(t)
			for _, w := range tc.want {
				if bytes.Equal(got, nvValue(w)) {
					return
				}
			}
			t.Errorf("NV with --allow-rollback = %q; want one of %q, values of the restored copy", got, tc.want)
		})
	}
}

// TestHostsRecoverFromReplacedHostTPM follows the advice a host prints when
// its keystore is sealed to a host TPM that was replaced: "recover this
// host's guardians from an export with `vtpm guardian import`". With the
// guardian exported beforehand, that must bring its TPMs back.
func TestHostsRecoverFromReplacedHostTPM(t *testing.T) {
	t.Parallel()
	testutil.Need(t, "swtpm")
	hw := &standInTPM{port: testutil.FreePorts(t, 2), state: t.TempDir()}
	hw.start(t)
	h := newVHost(t, "c", "VTPM_HOST_TPM="+hw.spec())
	const written = "before the host TPM was replaced"
	dir := newHostTPM(t, h, written)
	files := t.TempDir()
	pw := writeText(t, files, "pw", "backup password\n")
	p12 := filepath.Join(files, "c.p12")
	h.vtpm(t, "guardian", "export", "-o", p12, "--password-file", pw)

	hw.proc.Kill()
	if err := os.RemoveAll(hw.state); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(hw.state, 0o700); err != nil {
		t.Fatal(err)
	}
	hw.start(t)
	ks := filepath.Join(h.home, "keystore")
	mustContain(t, "the refusal", h.refuse(t, dir), "vtpm guardian import", "mv "+ks+" "+ks+".old")

	// As the advice says: move the keystore aside, then import the guardian.
	if err := os.Rename(ks, ks+".old"); err != nil {
		t.Fatal(err)
	}
	h.vtpm(t, "guardian", "import", p12, "--password-file", pw)
	p := h.start(t, dir)
	if got := p.nvRead(t); !bytes.Equal(got, nvValue(written)) {
		t.Errorf("NV after recovery = %q; want %q", got, written)
	}
	p.stop(t)
}
