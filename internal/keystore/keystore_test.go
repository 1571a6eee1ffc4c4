package keystore

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/testutil"
)

func quietOpts(hostTPM string) Options {
	return Options{HostTPM: hostTPM, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
}

func openFile(t *testing.T, dir string) *Keystore {
	t.Helper()
	k, err := Open(dir, quietOpts("none"))
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { k.Close() })
	return k
}

func mode(t *testing.T, p string) fs.FileMode {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestFileRoundTrip(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "data", "keystore") // neither exists yet
	k := openFile(t, dir)
	if got := k.Protection().Kind; got != "file" {
		t.Fatalf("Protection().Kind = %q, want file", got)
	}
	if !strings.Contains(k.Protection().Detail, "not sealed to a TPM") {
		t.Errorf("Protection().Detail = %q, want it to say the key is not TPM-sealed", k.Protection().Detail)
	}

	records := []struct {
		kind, name string
		data       []byte
	}{
		{"guardian", "local", []byte("hpke private key")},
		{"guardian", "fleet-a@example.org", bytes.Repeat([]byte{0xA5}, 1<<16)},
		{"tpm", "6f1c2a9e-0d3b-4a7e-9c55-1f2e3d4c5b6a", []byte{}},
		{"tpm", "with.dots_and+plus", []byte{0}},
	}
	for _, r := range records {
		if err := k.Put(r.kind, r.name, r.data); err != nil {
			t.Fatalf("Put(%s, %s): %v", r.kind, r.name, err)
		}
	}
	// Overwrite keeps the newest.
	if err := k.Put("guardian", "local", []byte("rotated")); err != nil {
		t.Fatal(err)
	}
	records[0].data = []byte("rotated")

	// Everything is readable, from this Keystore and from a second open.
	k2 := openFile(t, dir)
	for _, ks := range []*Keystore{k, k2} {
		for _, r := range records {
			got, err := ks.Get(r.kind, r.name)
			if err != nil {
				t.Fatalf("Get(%s, %s): %v", r.kind, r.name, err)
			}
			if !bytes.Equal(got, r.data) {
				t.Errorf("Get(%s, %s) = %d bytes, want %d", r.kind, r.name, len(got), len(r.data))
			}
		}
	}

	// Nothing is stored in clear, and every file and directory is private.
	if m := mode(t, dir); m != 0o700 {
		t.Errorf("keystore dir mode %04o, want 0700", m)
	}
	if m := mode(t, filepath.Join(dir, masterFile)); m != 0o600 {
		t.Errorf("master.key mode %04o, want 0600", m)
	}
	for _, r := range records {
		p := filepath.Join(dir, r.kind, r.name)
		if m := mode(t, p); m != 0o600 {
			t.Errorf("%s mode %04o, want 0600", p, m)
		}
		raw, _ := os.ReadFile(p)
		if len(r.data) > 4 && bytes.Contains(raw, r.data) {
			t.Errorf("%s holds the record in clear", p)
		}
	}
	if m := mode(t, filepath.Join(dir, "guardian")); m != 0o700 {
		t.Errorf("kind dir mode %04o, want 0700", m)
	}

	names, err := k.List("guardian")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"fleet-a@example.org", "local"}; strings.Join(names, ",") != strings.Join(want, ",") {
		t.Errorf("List(guardian) = %v, want %v", names, want)
	}
	if names, err := k.List("nothing-here"); err != nil || len(names) != 0 {
		t.Errorf("List of an unused kind = %v, %v; want empty, nil", names, err)
	}

	if err := k.Delete("guardian", "local"); err != nil {
		t.Fatal(err)
	}
	if _, err := k2.Get("guardian", "local"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Get after Delete: %v, want fs.ErrNotExist", err)
	}
	if err := k.Delete("guardian", "local"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("second Delete: %v, want fs.ErrNotExist", err)
	}
	if names, _ := k.List("guardian"); len(names) != 1 {
		t.Errorf("List after Delete = %v, want one name", names)
	}
}

func TestGetAbsent(t *testing.T) {
	k := openFile(t, filepath.Join(t.TempDir(), "ks"))
	_, err := k.Get("guardian", "nobody")
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Get of an absent record: %v, want fs.ErrNotExist", err)
	}
	if !strings.Contains(err.Error(), "nobody") {
		t.Errorf("error %q does not name the record", err)
	}
}

func TestInvalidKindName(t *testing.T) {
	k := openFile(t, filepath.Join(t.TempDir(), "ks"))
	tests := []struct{ kind, name string }{
		{"", "x"},
		{"Guardian", "x"},
		{"../etc", "x"},
		{"guardian", ""},
		{"guardian", ".hidden"},
		{"guardian", "a/b"},
		{"guardian", ".."},
		{"guardian", "space name"},
		{"guardian", strings.Repeat("a", 201)},
	}
	for _, tt := range tests {
		if err := k.Put(tt.kind, tt.name, []byte("x")); err == nil || !strings.Contains(err.Error(), "invalid") {
			t.Errorf("Put(%q, %q) = %v, want an 'invalid' error", tt.kind, tt.name, err)
		}
		if _, err := k.Get(tt.kind, tt.name); err == nil {
			t.Errorf("Get(%q, %q) succeeded", tt.kind, tt.name)
		}
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(k.Dir()), "etc")); err == nil {
		t.Error("a kind escaped the keystore directory")
	}
}

func TestTamper(t *testing.T) {
	tests := []struct {
		name   string
		tamper func(t *testing.T, dir, rec string)
		// the record whose Get must fail; "" means guardian/local
		get string
	}{
		{"flip ciphertext byte", func(t *testing.T, dir, rec string) {
			b, _ := os.ReadFile(rec)
			b[len(b)-20] ^= 1
			os.WriteFile(rec, b, 0o600)
		}, ""},
		{"flip tag byte", func(t *testing.T, dir, rec string) {
			b, _ := os.ReadFile(rec)
			b[len(b)-1] ^= 0x80
			os.WriteFile(rec, b, 0o600)
		}, ""},
		{"flip nonce byte", func(t *testing.T, dir, rec string) {
			b, _ := os.ReadFile(rec)
			b[recHeader] ^= 1
			os.WriteFile(rec, b, 0o600)
		}, ""},
		{"truncate", func(t *testing.T, dir, rec string) {
			os.Truncate(rec, 10)
		}, ""},
		{"empty", func(t *testing.T, dir, rec string) {
			os.Truncate(rec, 0)
		}, ""},
		{"bad magic", func(t *testing.T, dir, rec string) {
			b, _ := os.ReadFile(rec)
			copy(b, "XXXX")
			os.WriteFile(rec, b, 0o600)
		}, ""},
		{"future version", func(t *testing.T, dir, rec string) {
			b, _ := os.ReadFile(rec)
			b[4] = 9
			os.WriteFile(rec, b, 0o600)
		}, ""},
		{"record copied to another name", func(t *testing.T, dir, rec string) {
			b, _ := os.ReadFile(rec)
			os.WriteFile(filepath.Join(dir, "guardian", "other"), b, 0o600)
		}, "guardian/other"},
		{"record copied to another kind", func(t *testing.T, dir, rec string) {
			b, _ := os.ReadFile(rec)
			os.MkdirAll(filepath.Join(dir, "tpm"), 0o700)
			os.WriteFile(filepath.Join(dir, "tpm", "local"), b, 0o600)
		}, "tpm/local"},
		{"record from another keystore", func(t *testing.T, dir, rec string) {
			other := openFile(t, filepath.Join(t.TempDir(), "other"))
			if err := other.Put("guardian", "local", []byte("another host's key")); err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(filepath.Join(other.Dir(), "guardian", "local"))
			os.WriteFile(rec, b, 0o600)
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ks")
			k := openFile(t, dir)
			if err := k.Put("guardian", "local", []byte("secret guardian key material")); err != nil {
				t.Fatal(err)
			}
			rec := filepath.Join(dir, "guardian", "local")
			tt.tamper(t, dir, rec)
			kind, name := "guardian", "local"
			if tt.get != "" {
				kind, name, _ = strings.Cut(tt.get, "/")
			}
			_, err := k.Get(kind, name)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Get after tampering: %v, want ErrCorrupt", err)
			}
			if p := filepath.Join(dir, kind, name); !strings.Contains(err.Error(), p) {
				t.Errorf("error %q does not name the file %s", err, p)
			}
			if kind == "guardian" && !hasRemedy(err, errdefs.Do(errdefs.ActionGuardianImport)) {
				t.Errorf("error %q (ways out %+v) does not give the guardian recovery fix", err, errdefs.Remedies(err))
			}
		})
	}
}

func TestCorruptMaster(t *testing.T) {
	tests := []struct {
		name   string
		breakF func(dir string)
		want   error
	}{
		{"master key truncated", func(dir string) { os.Truncate(filepath.Join(dir, masterFile), 16) }, ErrCorrupt},
		{"master key missing but records exist", func(dir string) { os.Remove(filepath.Join(dir, masterFile)) }, ErrCorrupt},
		{"sealed master key damaged", func(dir string) {
			os.Remove(filepath.Join(dir, masterFile))
			os.WriteFile(filepath.Join(dir, masterTPMFile), []byte(`{"format":1,"srk_name":"AAs="`), 0o600)
		}, ErrCorrupt},
		{"master key replaced", func(dir string) {
			os.WriteFile(filepath.Join(dir, masterFile), bytes.Repeat([]byte{7}, masterKeyLen), 0o600)
		}, nil}, // opens; the records then fail with ErrCorrupt
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ks")
			k := openFile(t, dir)
			if err := k.Put("guardian", "local", []byte("key")); err != nil {
				t.Fatal(err)
			}
			k.Close()
			tt.breakF(dir)
			k2, err := Open(dir, quietOpts("none"))
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("Open: %v, want %v", err, tt.want)
				}
				if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "restore") {
					t.Errorf("error %q does not name the keystore and the fix", err)
				}
				if _, serr := os.Stat(filepath.Join(dir, masterFile)); tt.name == "master key missing but records exist" && serr == nil {
					t.Error("Open created a new master key over existing records")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer k2.Close()
			if _, err := k2.Get("guardian", "local"); !errors.Is(err, ErrCorrupt) {
				t.Errorf("Get under a replaced master key: %v, want ErrCorrupt", err)
			}
		})
	}
}

func TestPermissions(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, dir string)
		wantFix string // in the message
		// wantOwner: a way out is to run as the keystore directory's owner.
		wantOwner bool
	}{
		{"dir world-readable", func(t *testing.T, dir string) { os.Chmod(dir, 0o755) }, "chmod 700 ", false},
		{"dir group-accessible", func(t *testing.T, dir string) { os.Chmod(dir, 0o710) }, "chmod 700 ", false},
		{"master key readable by others", func(t *testing.T, dir string) {
			os.Chmod(filepath.Join(dir, masterFile), 0o644)
		}, "chmod 600 ", false},
		{"dir owned by another user", func(t *testing.T, dir string) {
			old := geteuid
			geteuid = func() int { return old() + 1000 }
			t.Cleanup(func() { geteuid = old })
		}, "owned by uid", true},
		{"dir is a symlink", func(t *testing.T, dir string) {
			real := dir + ".real"
			os.Rename(dir, real)
			os.Symlink(real, dir)
		}, "not a directory", false},
		{"master key is a symlink", func(t *testing.T, dir string) {
			mk := filepath.Join(dir, masterFile)
			os.Rename(mk, mk+".elsewhere")
			os.Symlink(mk+".elsewhere", mk)
		}, "symbolic link", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ks")
			k := openFile(t, dir)
			k.Close()
			tt.setup(t, dir)
			_, err := Open(dir, quietOpts("none"))
			if !errors.Is(err, ErrPermission) {
				t.Fatalf("Open: %v, want ErrPermission", err)
			}
			if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), tt.wantFix) {
				t.Errorf("error %q should name %s and the fix %q", err, dir, tt.wantFix)
			}
			if tt.wantOwner && !hasRemedy(err, errdefs.Do(errdefs.ActionRunAsOwner, "path", dir)) {
				t.Errorf("error %q: ways out %+v, want running as the owner of %s", err, errdefs.Remedies(err), dir)
			}
		})
	}
}

func TestUnwritableParent(t *testing.T) {
	if os.Geteuid() == 0 {
		// Root bypasses directory permissions; the owner check is covered
		// by TestPermissions.
		t.Skip("root can create directories anywhere")
	}
	parent := t.TempDir()
	os.Chmod(parent, 0o500)
	t.Cleanup(func() { os.Chmod(parent, 0o700) })
	_, err := Open(filepath.Join(parent, "ks"), quietOpts("none"))
	if !errors.Is(err, ErrPermission) {
		t.Fatalf("Open under a read-only parent: %v, want ErrPermission", err)
	}
}

func TestClosed(t *testing.T) {
	k := openFile(t, filepath.Join(t.TempDir(), "ks"))
	k.Close()
	if err := k.Put("guardian", "x", nil); err == nil {
		t.Error("Put after Close succeeded")
	}
}

const nonRootEnv = "VTPM_KEYSTORE_TEST_NONROOT"

// TestNonRootHelper opens the keystore named in its environment; it runs
// as an unprivileged user for TestNonRootOnRootKeystore.
func TestNonRootHelper(t *testing.T) {
	dir := os.Getenv(nonRootEnv)
	if dir == "" {
		t.Skip("helper process only")
	}
	_, err := Open(dir, quietOpts("none"))
	if !errors.Is(err, ErrPermission) {
		t.Fatalf("Open as uid %d: %v, want ErrPermission", os.Geteuid(), err)
	}
	os.Stdout.WriteString("ERROR: " + err.Error() + "\n")
	for _, r := range errdefs.Remedies(err) {
		fmt.Fprintf(os.Stdout, "FIX: %s %v %s\n", r.Action, r.Args, r.Note)
	}
}

// TestNonRootOnRootKeystore runs Open as the unprivileged user "nobody"
// against a root-owned keystore: one clear ErrPermission, no crash.
func TestNonRootOnRootKeystore(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "needs root to switch to an unprivileged user")
	}
	const nobody = 65534
	// A world-traversable place for the test binary and the keystore's
	// parent; the keystore itself is 0700 root.
	pub, err := os.MkdirTemp("", "vtpm-keystore-nonroot-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pub) })
	os.Chmod(pub, 0o755)
	dir := filepath.Join(pub, "keystore")
	k, err := Open(dir, quietOpts("none"))
	if err != nil {
		t.Fatal(err)
	}
	k.Close()
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(pub, "keystore.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestNonRootHelper$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), nonRootEnv+"="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper as uid %d: %v\n%s", nobody, err, out)
	}
	t.Logf("as uid %d: %s", nobody, out)
	for _, want := range []string{dir, "owned by uid 0", "FIX: " + string(errdefs.ActionRunAsOwner) + " map[path:" + dir + "]", "VTPM_HOME"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("helper output lacks %q:\n%s", want, out)
		}
	}
}

func TestStaleTempFiles(t *testing.T) {
	k := openFile(t, filepath.Join(t.TempDir(), "ks"))
	if err := k.Put("guardian", "local", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	// A crash between creating and renaming a temp file leaves this behind.
	stale := filepath.Join(k.Dir(), "guardian", ".local.tmp-12345")
	if err := os.WriteFile(stale, []byte("torn"), 0o600); err != nil {
		t.Fatal(err)
	}
	if names, _ := k.List("guardian"); len(names) != 1 || names[0] != "local" {
		t.Errorf("List = %v, want [local]: temp files are not records", names)
	}
	if err := k.Put("guardian", "local", []byte("v2")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temp file survived the next Put: %v", err)
	}
	if got, err := k.Get("guardian", "local"); err != nil || string(got) != "v2" {
		t.Errorf("Get = %q, %v; want v2", got, err)
	}
}

// hasRemedy reports whether want is among err's ways out.
func hasRemedy(err error, want errdefs.Remedy) bool {
	return slices.ContainsFunc(errdefs.Remedies(err), want.Equal)
}
