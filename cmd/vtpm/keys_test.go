package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/testutil"
)

// These tests drive the key commands (guardian, protector, key, tpm policy)
// through the vtpm binary. A "host" is a data root of its own ($VTPM_HOME):
// two of them on one machine are two hosts with their own keystores and
// guardians.

type cliHost struct {
	t    *testing.T
	home string
}

func newCLIHost(t *testing.T) *cliHost {
	t.Helper()
	return &cliHost{t: t, home: filepath.Join(t.TempDir(), "home")}
}

// with returns h for use in the (sub)test t.
func (h *cliHost) with(t *testing.T) *cliHost {
	c := *h
	c.t = t
	return &c
}

func (h *cliHost) env() []string {
	return []string{"VTPM_HOME=" + h.home, "VTPM_HOST_TPM=none", "VTPM_PASSWORD=", "VTPM_PASSPHRASE="}
}

// run runs a vtpm command that must succeed and returns its output.
func (h *cliHost) run(args ...string) string {
	h.t.Helper()
	return testutil.Run(h.t, h.env(), testutil.Binary(h.t), args...)
}

// fail runs a vtpm command that must fail and returns its output.
func (h *cliHost) fail(args ...string) string {
	h.t.Helper()
	out, err := testutil.RunErr(h.env(), testutil.Binary(h.t), args...)
	if err == nil {
		h.t.Fatalf("vtpm %s succeeded; want an error:\n%s", strings.Join(args, " "), out)
	}
	return out
}

// fingerprint is this host's own guardian's fingerprint.
func (h *cliHost) fingerprint() string {
	h.t.Helper()
	var info struct {
		Fingerprint string `json:"fingerprint"`
		Local       bool   `json:"local"`
	}
	out := h.run("guardian", "show", "--json")
	if err := json.Unmarshal([]byte(out), &info); err != nil || !info.Local || len(info.Fingerprint) != 64 {
		h.t.Fatalf("guardian show --json: %v\n%s", err, out)
	}
	return info.Fingerprint
}

// guardians lists the fingerprints of the guardians this host holds.
func (h *cliHost) guardians() []string {
	h.t.Helper()
	var list []struct {
		Fingerprint string `json:"fingerprint"`
	}
	out := h.run("guardian", "list", "--json")
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		h.t.Fatalf("guardian list --json: %v\n%s", err, out)
	}
	var fps []string
	for _, g := range list {
		fps = append(fps, g.Fingerprint)
	}
	return fps
}

// keystore returns every file of the host's keystore.
func (h *cliHost) keystore() map[string][]byte {
	return filesUnder(h.t, filepath.Join(h.home, "keystore"))
}

// filesUnder maps every regular file under dir (relative path) to its contents.
func filesUnder(t *testing.T, dir string) map[string][]byte {
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

func sameFiles(a, b map[string][]byte) bool { return maps.EqualFunc(a, b, bytes.Equal) }

// newTPMDir runs a vTPM on h once on a new state directory, so that it gets
// its key, its protector and sealed state, and returns the directory.
func (h *cliHost) newTPMDir() string {
	h.t.Helper()
	testutil.Need(h.t, "swtpm_ioctl")
	dir := filepath.Join(h.t.TempDir(), "tpm")
	sock := filepath.Join(shortTemp(h.t), "ctrl")
	p := testutil.Start(h.t, testutil.Binary(h.t), h.env(), sock,
		"--tpm2", "--tpmstate", "dir="+dir, "--ctrl", "type=unixio,path="+sock, "--flags", "not-need-init,startup-clear")
	testutil.Run(h.t, nil, "swtpm_ioctl", "--unix", sock, "-s")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		h.t.Fatalf("vTPM did not exit cleanly: %v\n%s", err, p.Stderr)
	}
	return dir
}

// copyTPMDir copies a state directory's files (not its lock), as copying a
// VM to another host does.
func copyTPMDir(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "copy")
	if err := os.Mkdir(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range filesUnder(t, src) {
		if name == ".lock" || strings.Contains(name, "/") {
			continue
		}
		if err := os.WriteFile(filepath.Join(dst, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// shortTemp is a directory with a path short enough for unix sockets.
func shortTemp(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "vk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func wantIn(t *testing.T, out string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}

// TestGuardianExportOpenSSL exports a guardian with the CLI and reads it with
// openssl, which must find the private key and both certificates; the file
// openssl re-exports imports on another host, which can then open the TPMs
// that guardian protects.
func TestGuardianExportOpenSSL(t *testing.T) {
	t.Parallel()
	testutil.Need(t, "openssl")
	a, b := newCLIHost(t), newCLIHost(t)
	tpmA := a.newTPMDir()
	fp := a.fingerprint()
	dir := t.TempDir()
	pw := writeFile(t, dir, "pw", "correct horse battery\n")
	p12 := filepath.Join(dir, "a.p12")
	a.run("guardian", "export", "-o", p12, "--password-file", pw)
	if st, err := os.Stat(p12); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("exported PKCS#12: %v, mode %v; want a 0600 file", err, st.Mode().Perm())
	}

	out, err := exec.Command("openssl", "pkcs12", "-in", p12, "-passin", "pass:correct horse battery", "-nodes").CombinedOutput()
	if err != nil {
		t.Fatalf("openssl pkcs12 -nodes: %v\n%s", err, out)
	}
	var keys []any
	var certs []*x509.Certificate
	for rest := out; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		switch blk.Type {
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
			if err != nil {
				t.Fatalf("openssl printed a private key that does not parse: %v", err)
			}
			keys = append(keys, k)
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			certs = append(certs, c)
		}
	}
	if len(keys) != 1 || len(certs) != 2 {
		t.Fatalf("openssl printed %d private keys and %d certificates; want 1 and 2:\n%s", len(keys), len(certs), out)
	}
	var signing *x509.Certificate
	for _, c := range certs {
		if sum := sha256.Sum256(c.Raw); hex.EncodeToString(sum[:]) == fp {
			signing = c
		}
	}
	if signing == nil {
		t.Fatalf("no certificate printed by openssl has the guardian's fingerprint %s", fp)
	}
	key, ok := keys[0].(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(signing.PublicKey) {
		t.Fatalf("the private key (%T) is not the signing certificate's", keys[0])
	}
	if out, err := exec.Command("openssl", "pkcs12", "-in", p12, "-passin", "pass:wrong", "-nodes").CombinedOutput(); err == nil {
		t.Fatalf("openssl opened the file with a wrong password:\n%s", out)
	}

	// What openssl makes of it is still the guardian: B imports openssl's
	// re-export and can open A's TPM.
	pemFile := writeFile(t, dir, "a.pem", string(out))
	re := filepath.Join(dir, "re.p12")
	if out, err := exec.Command("openssl", "pkcs12", "-export", "-in", pemFile, "-out", re, "-passout", "pass:other").CombinedOutput(); err != nil {
		t.Fatalf("openssl pkcs12 -export: %v\n%s", err, out)
	}
	copyB := copyTPMDir(t, tpmA)
	pp := writeFile(t, dir, "pp", "a passphrase")
	wantIn(t, b.fail("key", "export", copyB, "-o", filepath.Join(dir, "before.key"), "--passphrase-file", pp), "cannot be opened on this host", fp)
	b.run("guardian", "import", re, "--password-file", writeFile(t, dir, "other", "other"))
	if got := b.guardians(); len(got) != 2 || got[1] != fp {
		t.Fatalf("B's guardians after import: %v; want its own and %s", got, fp)
	}
	b.run("key", "export", copyB, "-o", filepath.Join(dir, "after.key"), "--passphrase-file", pp)
}

// TestGuardianCommandErrors checks that failing guardian commands say why
// and change nothing.
func TestGuardianCommandErrors(t *testing.T) {
	t.Parallel()
	a := newCLIHost(t)
	dir := t.TempDir()
	pw := writeFile(t, dir, "pw", "pw")
	p12 := filepath.Join(dir, "a.p12")
	a.run("guardian", "export", "-o", p12, "--password-file", pw)
	certs := filepath.Join(dir, "a.pem")
	a.run("guardian", "export", "--certs-only", "-o", certs)
	if b, err := os.ReadFile(certs); err != nil || bytes.Count(b, []byte("BEGIN CERTIFICATE")) != 2 || bytes.Contains(b, []byte("PRIVATE")) {
		t.Fatalf("--certs-only export: %v\n%s", err, b)
	}
	empty := writeFile(t, dir, "empty", "\n")
	bad := writeFile(t, dir, "bad", "not the password\n")

	tests := []struct {
		name    string
		prepare func(b *cliHost) // on the importing host, before the failing command
		args    []string
		want    []string
	}{
		{name: "import with a wrong password", args: []string{"guardian", "import", p12, "--password-file", bad}, want: []string{"wrong PKCS#12 password"}},
		{name: "import without a password", args: []string{"guardian", "import", p12}, want: []string{"no password", "--password-file"}},
		{name: "import certificates only", args: []string{"guardian", "import", certs, "--password-file", pw},
			want: []string{"PKCS#12", "PEM text holding 2 certificates", "vtpm guardian trust " + certs, "vtpm protector grant TPM " + certs}},
		{name: "import a missing file", args: []string{"guardian", "import", filepath.Join(dir, "absent.p12"), "--password-file", pw}, want: []string{"absent.p12"}},
		{
			name:    "import twice",
			prepare: func(b *cliHost) { b.run("guardian", "import", p12, "--password-file", pw) },
			args:    []string{"guardian", "import", p12, "--password-file", pw},
			want:    []string{"already present", "--replace"},
		},
		{name: "export without -o", args: []string{"guardian", "export", "--password-file", pw}, want: []string{"-o FILE"}},
		{name: "export with an empty password", args: []string{"guardian", "export", "-o", filepath.Join(dir, "x.p12"), "--password-file", empty}, want: []string{"empty PKCS#12 password"}},
		{name: "export over an existing file", args: []string{"guardian", "export", "-o", p12, "--password-file", pw}, want: []string{"already exists", "nothing was overwritten"}},
		{name: "export an unknown guardian", args: []string{"guardian", "export", "host:nowhere", "--certs-only"}, want: []string{"no guardian"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := newCLIHost(t)
			b.fingerprint() // create the host
			if tc.prepare != nil {
				tc.prepare(b)
			}
			before, p12Before := b.keystore(), filesUnder(t, dir)
			wantIn(t, b.fail(tc.args...), tc.want...)
			if !sameFiles(b.keystore(), before) {
				t.Error("the failed command changed the keystore")
			}
			if !sameFiles(filesUnder(t, dir), p12Before) {
				t.Error("the failed command changed the exported files")
			}
		})
	}

	t.Run("remove own guardian by fingerprint", func(t *testing.T) {
		t.Parallel()
		b := newCLIHost(t)
		wantIn(t, b.fail("guardian", "remove", b.fingerprint()), "this host's own guardian")
	})
	fp := a.fingerprint()
	t.Run("import --replace, remove", func(t *testing.T) {
		t.Parallel()
		b := newCLIHost(t)
		b.run("guardian", "import", p12, "--password-file", pw)
		wantIn(t, b.run("guardian", "import", p12, "--password-file", pw, "--replace"), "imported guardian", fp)
		wantIn(t, b.run("guardian", "remove", fp[:12]), "removed guardian", fp)
		if got := b.guardians(); len(got) != 1 || got[0] != b.fingerprint() {
			t.Errorf("guardians after remove: %v; want this host's own only", got)
		}
	})
}

// TestProtectorCommands grants and revokes with the CLI; every refused change
// leaves protector.json as it was.
func TestProtectorCommands(t *testing.T) {
	t.Parallel()
	a, b := newCLIHost(t), newCLIHost(t)
	tpm := a.newTPMDir()
	fpA, fpB := a.fingerprint(), b.fingerprint()
	dir := t.TempDir()
	certsB := filepath.Join(dir, "b.pem")
	b.run("guardian", "export", "--certs-only", "-o", certsB)
	p12 := filepath.Join(dir, "a.p12")
	pw := writeFile(t, dir, "pw", "pw")
	a.run("guardian", "export", "-o", p12, "--password-file", pw)
	wantIn(t, a.run("protector", "grant", tpm, certsB), "granted")

	var shown struct {
		Owner string
		Rows  []struct {
			Name, Fingerprint string
			Owner             bool
		}
	}
	if err := json.Unmarshal([]byte(a.run("protector", "show", "--json", tpm)), &shown); err != nil {
		t.Fatal(err)
	}
	if shown.Owner != fpA || len(shown.Rows) != 2 || shown.Rows[0].Fingerprint != fpA || !shown.Rows[0].Owner || shown.Rows[1].Fingerprint != fpB {
		t.Fatalf("protector show after grant: %+v; want A (owner) and B", shown)
	}
	// Both hosts run on this machine, so their guardians have the same name.
	name := shown.Rows[0].Name
	if shown.Rows[1].Name != name {
		t.Fatalf("guardian names %q and %q; this test expects both to be host:<hostname>", name, shown.Rows[1].Name)
	}

	tests := []struct {
		name string
		host *cliHost
		args []string
		want []string
	}{
		{name: "revoke by a name two guardians share", host: a, args: []string{"protector", "revoke", tpm, name}, want: []string{"give a fingerprint"}},
		{name: "revoke the owner", host: a, args: []string{"protector", "revoke", tpm, fpA}, want: []string{"cannot revoke the owner"}},
		{name: "revoke an unknown guardian", host: a, args: []string{"protector", "revoke", tpm, "0123456789abcdef"}, want: []string{"no guardian", "protector show"}},
		{name: "grant again", host: a, args: []string{"protector", "grant", tpm, certsB}, want: []string{"already holds a row"}},
		{name: "grant a PKCS#12 file", host: a, args: []string{"protector", "grant", tpm, p12}, want: []string{p12}},
		{name: "grant on a host that is not the owner", host: b, args: []string{"protector", "grant", tpm, certsB}, want: []string{"only the owner", fpA}},
		{name: "revoke on a host that is not the owner", host: b, args: []string{"protector", "revoke", tpm, fpB}, want: []string{"only the owner", fpA}},
		{name: "show a directory without a TPM", host: a, args: []string{"protector", "show", dir}, want: []string{"protector.json"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := filesUnder(t, tpm)
			wantIn(t, tc.host.with(t).fail(tc.args...), tc.want...)
			if !sameFiles(filesUnder(t, tpm), before) {
				t.Error("the refused command changed the TPM's directory")
			}
		})
	}

	wantIn(t, a.run("protector", "revoke", tpm, fpB[:16]), "revoked")
	if err := json.Unmarshal([]byte(a.run("protector", "show", "--json", tpm)), &shown); err != nil {
		t.Fatal(err)
	}
	if len(shown.Rows) != 1 || shown.Rows[0].Fingerprint != fpA {
		t.Fatalf("protector after revoking B: %+v; want A's row only", shown.Rows)
	}
}

// TestKeyExportCommand checks the export side of `vtpm key`: it exports only
// the key of a TPM that exists and that this host can open, and never
// creates one.
func TestKeyExportCommand(t *testing.T) {
	t.Parallel()
	a, b := newCLIHost(t), newCLIHost(t)
	tpm := a.newTPMDir()
	dir := t.TempDir()
	pp := writeFile(t, dir, "pp", "a long passphrase\n")
	emptyDir := t.TempDir()
	tests := []struct {
		name  string
		host  *cliHost
		args  []string
		want  []string
		check func(t *testing.T) // nothing was created
	}{
		{
			name: "a directory that does not exist",
			host: a, args: []string{"key", "export", filepath.Join(dir, "typo"), "-o", filepath.Join(dir, "k1"), "--passphrase-file", pp},
			want: []string{"typo"},
			check: func(t *testing.T) {
				if _, err := os.Stat(filepath.Join(dir, "typo")); err == nil {
					t.Error("key export created the TPM directory it was asked to export from")
				}
			},
		},
		{
			name: "an empty directory",
			host: a, args: []string{"key", "export", emptyDir, "-o", filepath.Join(dir, "k2"), "--passphrase-file", pp},
			want: []string{emptyDir},
			check: func(t *testing.T) {
				if got := filesUnder(t, emptyDir); len(got) != 0 {
					t.Errorf("key export provisioned a TPM in an empty directory: %v", slicesOf(got))
				}
			},
		},
		{name: "no passphrase", host: a, args: []string{"key", "export", tpm, "-o", filepath.Join(dir, "k3")}, want: []string{"no passphrase"}},
		{name: "no output file", host: a, args: []string{"key", "export", tpm, "--passphrase-file", pp}, want: []string{"-o FILE"}},
		{name: "a host that cannot open it", host: b, args: []string{"key", "export", tpm, "-o", filepath.Join(dir, "k4"), "--passphrase-file", pp}, want: []string{"cannot be opened on this host", "Ways out"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := filesUnder(t, tpm)
			wantIn(t, tc.host.with(t).fail(tc.args...), tc.want...)
			if tc.check != nil {
				tc.check(t)
			}
			if !sameFiles(filesUnder(t, tpm), before) {
				t.Error("the failed export changed the TPM's directory")
			}
			for _, k := range []string{"k1", "k2", "k3", "k4"} {
				if _, err := os.Stat(filepath.Join(dir, k)); err == nil {
					t.Errorf("the failed export wrote %s", k)
				}
			}
		})
	}

	out := filepath.Join(dir, "tpm.key")
	a.run("key", "export", tpm, "-o", out, "--passphrase-file", pp)
	st, err := os.Stat(out)
	if err != nil || st.Size() != 120 || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, %d bytes, mode %v; want a 120-byte 0600 file", err, st.Size(), st.Mode().Perm())
	}
	old, _ := os.ReadFile(out)
	wantIn(t, a.fail("key", "export", tpm, "-o", out, "--passphrase-file", pp), "already exists")
	if now, _ := os.ReadFile(out); !bytes.Equal(now, old) {
		t.Error("a refused export overwrote the key file")
	}
}

func slicesOf(m map[string][]byte) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	return s
}

func TestTPMPolicyCommand(t *testing.T) {
	t.Parallel()
	a := newCLIHost(t)
	tpm := a.newTPMDir()
	policy := filepath.Join(tpm, "policy.json")
	steps := []struct {
		args    []string
		fails   bool
		want    string
		wantPol string // policy.json's on_missing_key afterwards; "" = no file
	}{
		{args: []string{"tpm", "policy", tpm}, want: "on-missing-key: fail"},
		{args: []string{"tpm", "policy", tpm, "--on-missing-key", "wipe"}, fails: true, want: `"wipe"`},
		{args: []string{"tpm", "policy", tpm, "--on-missing-key", "reprovision"}, want: "on-missing-key: reprovision", wantPol: "reprovision"},
		{args: []string{"tpm", "policy", tpm}, want: "on-missing-key: reprovision", wantPol: "reprovision"},
		{args: []string{"tpm", "policy", tpm, "--on-missing-key", "wipe"}, fails: true, want: `"wipe"`, wantPol: "reprovision"},
		{args: []string{"tpm", "policy", tpm, "--on-missing-key", "fail"}, want: "on-missing-key: fail", wantPol: "fail"},
		{args: []string{"tpm", "policy", filepath.Join(tpm, "absent"), "--on-missing-key", "fail"}, fails: true, want: "absent", wantPol: "fail"},
	}
	for _, s := range steps {
		var out string
		if s.fails {
			out = a.fail(s.args...)
		} else {
			out = a.run(s.args...)
		}
		wantIn(t, out, s.want)
		var p struct {
			OnMissingKey string `json:"on_missing_key"`
		}
		b, err := os.ReadFile(policy)
		switch {
		case s.wantPol == "" && err == nil:
			t.Errorf("after %v: policy.json exists: %s", s.args, b)
		case s.wantPol != "" && (err != nil || json.Unmarshal(b, &p) != nil || p.OnMissingKey != s.wantPol):
			t.Errorf("after %v: policy.json = %s (%v); want on_missing_key %q", s.args, b, err, s.wantPol)
		}
	}
}

// BenchmarkSwtpmStart measures `vtpm swtpm socket` from process start to the
// first answered control command (CMD_GET_CAPABILITY), on an existing TPM:
// with its key from its protector (keystore, protector, state), and with
// the key given by --data-key (keystore for generations, state).
func BenchmarkSwtpmStart(b *testing.B) {
	bin := testutil.Binary(b)
	home := filepath.Join(b.TempDir(), "home")
	env := append(os.Environ(), "VTPM_HOME="+home, "VTPM_HOST_TPM=none")
	keyFile := filepath.Join(b.TempDir(), "dek")
	if err := os.WriteFile(keyFile, []byte(strings.Repeat("5a", 32)), 0o600); err != nil {
		b.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "vb")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "ctrl")
	start := func(b *testing.B, dir string, extra ...string) {
		cmd := exec.Command(bin, append([]string{"swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + dir,
			"--ctrl", "type=unixio,path=" + sock, "--flags", "not-need-init,startup-clear"}, extra...)...)
		cmd.Env = env
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() {
			b.StopTimer()
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
			os.Remove(sock)
			b.StartTimer()
		}()
		deadline := time.Now().Add(10 * time.Second)
		for {
			c, err := net.Dial("unix", sock)
			if err == nil {
				defer c.Close()
				if _, err := c.Write([]byte{0, 0, 0, 1}); err != nil { // CMD_GET_CAPABILITY
					b.Fatal(err)
				}
				rsp := make([]byte, 8)
				if _, err := c.Read(rsp); err != nil || rsp[3] != 0 {
					b.Fatalf("CMD_GET_CAPABILITY: % x, %v\n%s", rsp, err, stderr.Bytes())
				}
				return
			}
			if time.Now().After(deadline) {
				b.Fatalf("no control socket: %v\n%s", err, stderr.Bytes())
			}
			time.Sleep(100 * time.Microsecond)
		}
	}
	for _, tc := range []struct {
		name  string
		extra []string
	}{
		{"protector", nil},
		{"data-key", []string{"--data-key", "file=" + keyFile}},
	} {
		dir := filepath.Join(b.TempDir(), "tpm")
		start(b, dir, tc.extra...) // create it
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				start(b, dir, tc.extra...)
			}
		})
	}
}
