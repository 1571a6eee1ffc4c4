package hostsvc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/state"
	"vtpm/internal/swtpm/statefile"
	"vtpm/internal/testutil"
)

// The helper process: the test binary re-executed as another user, asking
// the service as a vTPM would (or as a compromised one might).
const (
	helperEnv     = "VTPM_HOSTSVC_HELPER" // what to do: open, steal, hold, adopt, adopt-unlocked
	helperDirEnv  = "VTPM_HOSTSVC_DIR"
	helperBlobEnv = "VTPM_HOSTSVC_BLOB" // the migration blob to adopt from
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(helper(mode, os.Getenv(helperDirEnv)))
	}
	os.Exit(m.Run())
}

// helper prints "ok TPM" or "err KIND: message"; "hold" takes dir's lock,
// prints "locked" and keeps it until stdin closes.
func helper(mode, dir string) int {
	report := func(err error) int {
		kind := "none"
		if k := errdefs.KindOf(err); k != nil {
			kind = k.Error()
		}
		fmt.Printf("err %s: %v\n", kind, err)
		var se *ServiceError
		if errors.As(err, &se) && len(se.Guardians) > 0 {
			fmt.Printf("guardians: %s\n", strings.Join(se.Guardians, ", "))
		}
		return 1
	}
	switch mode {
	case "open": // a vTPM: holds its directory's lock while it asks
		o, err := Client{}.Open(dir, keybroker.OpenOptions{})
		if err != nil {
			return report(err)
		}
		defer o.Close()
		fmt.Println("ok", o.TPM)
		return 0
	case "steal": // sends another TPM's directory without holding its lock
		d, err := os.Open(dir)
		if err != nil {
			return report(err)
		}
		a, files, conn, err := Client{}.call(request{Op: opOpen, Dir: dir}, d)
		if err != nil {
			return report(err)
		}
		conn.Close()
		for _, f := range files {
			f.Close()
		}
		fmt.Println("ok", a.TPM)
		return 0
	case "adopt", "adopt-unlocked": // a vTPM on an empty directory, a TPM arriving
		blob, err := os.ReadFile(os.Getenv(helperBlobEnv))
		if err != nil {
			return report(err)
		}
		r, err := Client{}.Reserve()
		if err != nil {
			return report(err)
		}
		if mode == "adopt" {
			l, err := state.Lock(dir)
			if err != nil {
				return report(err)
			}
			defer l.Unlock()
		}
		o, err := r.Adopt(dir, blob, 0o600, keybroker.OpenOptions{})
		if err != nil {
			return report(err)
		}
		defer o.Close()
		fmt.Println("ok", o.TPM)
		return 0
	case "hold":
		l, err := state.Lock(dir)
		if err != nil {
			return report(err)
		}
		defer l.Unlock()
		fmt.Println("locked")
		io.Copy(io.Discard, os.Stdin)
		return 0
	}
	return 2
}

type env struct {
	t      *testing.T
	broker *keybroker.Broker // the service's
	base   string            // searchable by every user
	exe    string            // the test binary, where other users can run it
	socket string
}

// newEnv starts a host service in this process on a socket other users can
// reach, with a keystore of its own.
func newEnv(t *testing.T) *env {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "the host service's tests run processes as other users: run them as root")
	}
	base, err := os.MkdirTemp("", "vtpm-hostsvc-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, base: base, exe: filepath.Join(base, "hostsvc.test"), socket: filepath.Join(base, "host.sock")}
	copyFile(t, self, e.exe)
	b, err := keybroker.Open(filepath.Join(base, "root"), keystore.Options{HostTPM: "none", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	e.broker = b
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: e.socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(e.socket, 0o666)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- NewServer(b, &Config{Users: DefaultUsers}, slog.New(slog.DiscardHandler)).Serve(ctx, l)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return e
}

func copyFile(t *testing.T, from, to string) {
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// stateDir makes an empty state directory owned by user.
func (e *env) stateDir(name, owner string) string {
	dir := filepath.Join(e.base, name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		e.t.Fatal(err)
	}
	uid, gid := lookup(e.t, owner)
	if err := os.Chown(dir, uid, gid); err != nil {
		e.t.Fatal(err)
	}
	return dir
}

func lookup(t *testing.T, name string) (int, int) {
	u, err := user.Lookup(name)
	if err != nil {
		testutil.Missing(t, "no user %s on this host", name)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return uid, gid
}

// helperCmd runs the helper as user.
func (e *env) helperCmd(as, mode, dir string) *exec.Cmd {
	uid, gid := lookup(e.t, as)
	cmd := exec.Command(e.exe)
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, helperDirEnv+"="+dir, SocketEnv+"="+e.socket, "HOME=/root")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	return cmd
}

func (e *env) run(as, mode, dir string) string {
	out, _ := e.helperCmd(as, mode, dir).CombinedOutput()
	return strings.TrimSpace(string(out))
}

// hold has a process of user as hold dir's lock until the test ends, as a
// running vTPM does.
func (e *env) hold(as, dir string) {
	cmd := e.helperCmd(as, "hold", dir)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	if strings.TrimSpace(line) != "locked" {
		e.t.Fatalf("lock holder: %q", line)
	}
}

// A vTPM gets the key of the TPM whose directory it holds, and no other:
// not of a directory another vTPM of the same user holds, nor of one no
// process holds, nor of another user's, and a user the service does not
// answer gets nothing.
func TestOnlyTheHolderGetsTheKey(t *testing.T) {
	e := newEnv(t)
	mine := e.stateDir("mine", "tss")
	first := e.run("tss", "open", mine)
	if !strings.HasPrefix(first, "ok ") {
		t.Fatalf("the holder of a new directory got no key: %s", first)
	}
	if again := e.run("tss", "open", mine); again != first {
		t.Errorf("opened again: %q, want the same TPM %q", again, first)
	}
	for _, name := range []string{state.ProtectorFile, "vtpm-state.json"} {
		st, err := os.Stat(filepath.Join(mine, name))
		if err != nil {
			t.Fatal(err)
		}
		if uid, _ := lookup(t, "tss"); int(st.Sys().(*syscall.Stat_t).Uid) != uid {
			t.Errorf("%s belongs to uid %d, want the directory's owner tss", name, st.Sys().(*syscall.Stat_t).Uid)
		}
	}

	running := e.stateDir("running", "tss")
	if out := e.run("tss", "open", running); !strings.HasPrefix(out, "ok ") {
		t.Fatal(out)
	}
	e.hold("tss", running) // its vTPM runs
	idle := e.stateDir("idle", "tss")
	if out := e.run("tss", "open", idle); !strings.HasPrefix(out, "ok ") {
		t.Fatal(out)
	}
	linked := e.stateDir("linked", "tss")
	if err := os.Symlink("/etc/shadow", filepath.Join(linked, state.ProtectorFile)); err != nil {
		t.Fatal(err)
	}
	others := e.stateDir("others", "nobody")
	os.Chmod(others, 0o755) // readable, so its descriptor can be sent
	tests := []struct {
		name, as, mode, dir string
	}{
		{"another vTPM's running directory", "tss", "steal", running},
		{"a directory nobody holds", "tss", "steal", idle},
		{"another user's directory", "tss", "steal", others},
		{"a user the service does not answer", "nobody", "open", others},
	}
	t.Run("a key protector linked to a root file", func(t *testing.T) {
		if out := e.run("tss", "open", linked); !strings.HasPrefix(out, "err "+errdefs.ErrInvalidArgument.Error()+":") {
			t.Errorf("got %q, want the link refused", out)
		}
	})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := e.run(tt.as, tt.mode, tt.dir)
			t.Log(out)
			if !strings.HasPrefix(out, "err "+errdefs.ErrPermissionDenied.Error()+":") {
				t.Errorf("got %q, want a permission denied", out)
			}
		})
	}
}

// A process that cannot reach the service gets one error that names both
// attempts and says how to start the service.
func TestFallbackNamesBothAttemptsAndTheFix(t *testing.T) {
	ksErr := errdefs.New(errdefs.ErrPermissionDenied, "open keystore: permission denied")
	_, svcErr := Client{Socket: filepath.Join(t.TempDir(), "none.sock")}.Open(t.TempDir(), keybroker.OpenOptions{})
	err := Fallback(ksErr, svcErr)
	var both *NoKeysError
	if !errors.As(err, &both) {
		t.Fatalf("Fallback = %v, want a NoKeysError", err)
	}
	if !errors.Is(err, errdefs.ErrUnavailable) || !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("%v matches neither the keystore's kind nor the service's", err)
	}
	for _, want := range []string{"keystore", "host service", "none.sock"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not name %q", err, want)
		}
	}
	var actions []errdefs.Action
	for _, r := range errdefs.Remedies(err) {
		actions = append(actions, r.Action)
	}
	if len(actions) < 2 || actions[0] != errdefs.ActionHostServiceStart || actions[1] != errdefs.ActionHostServe {
		t.Errorf("remedies %v, want starting the service first", actions)
	}
	// A service that answered reports its own error.
	refused := &ServiceError{Kind: errdefs.ErrPermissionDenied, Message: "no"}
	if err := Fallback(ksErr, refused); errors.As(err, &both) || !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("Fallback of an answer = %v", err)
	}
}

// migrationBlob is a permanent-state migration blob of the TPM in dir
// (opened with broker), carrying its adoption record; tamper changes a
// byte the record's MAC covers.
func migrationBlob(t *testing.T, broker *keybroker.Broker, dir, out string, tamper bool) (string, uuid.UUID) {
	t.Helper()
	o, err := broker.OpenTPMWith(dir, keybroker.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	prot, err := os.ReadFile(filepath.Join(dir, state.ProtectorFile))
	if err != nil {
		t.Fatal(err)
	}
	mig, err := o.Key.MigrationKey()
	if err != nil {
		t.Fatal(err)
	}
	defer mig.Close()
	plain, _, err := statefile.EncodeMigration([]byte("permanent state"), nil, &statefile.Key{Bytes: mig.Bytes()}, false)
	if err != nil {
		t.Fatal(err)
	}
	blob, err := keybroker.AppendAdoptRecord(plain, &keybroker.AdoptRecord{TPM: o.TPM, Protector: prot}, mig.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if tamper {
		blob[len(plain)-1] ^= 1
	}
	if err := os.WriteFile(out, blob, 0o644); err != nil {
		t.Fatal(err)
	}
	return out, o.TPM
}

// A vTPM on an empty directory that runs as tss adopts a TPM arriving in a
// migration stream through a connection it kept to the service: the
// service writes the TPM's identity and protector into the directory the
// caller holds (and gives them to its owner) and hands over the key. It
// refuses a stream whose record does not verify, a directory the caller
// does not hold or that holds sealed state, and a TPM whose protector does
// not admit this host (naming the guardians that could open it).
func TestAdoptThroughTheService(t *testing.T) {
	e := newEnv(t)
	srcDir := filepath.Join(e.base, "src")
	blob, tpm := migrationBlob(t, e.broker, srcDir, filepath.Join(e.base, "blob"), false)
	tampered, _ := migrationBlob(t, e.broker, srcDir, filepath.Join(e.base, "tampered"), true)

	// A TPM of another host, whose protector admits only that host.
	other, err := keybroker.Open(filepath.Join(e.base, "other-root"), keystore.Options{HostTPM: "none", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	foreign, _ := migrationBlob(t, other, filepath.Join(e.base, "foreign"), filepath.Join(e.base, "foreign-blob"), false)

	dst := e.stateDir("dst", "tss")
	cmd := e.helperCmd("tss", "adopt", dst)
	cmd.Env = append(cmd.Env, helperBlobEnv+"="+blob)
	out, _ := cmd.CombinedOutput()
	if got := strings.TrimSpace(string(out)); got != "ok "+tpm.String() {
		t.Fatalf("adopt: %q, want ok %s", got, tpm)
	}
	for _, name := range []string{state.ProtectorFile, "vtpm-state.json"} {
		b, err := os.ReadFile(filepath.Join(dst, name))
		if err != nil {
			t.Fatal(err)
		}
		src, _ := os.ReadFile(filepath.Join(srcDir, name))
		if string(b) != string(src) {
			t.Errorf("%s: %q, want the source's %q", name, b, src)
		}
		st, _ := os.Stat(filepath.Join(dst, name))
		if uid, _ := lookup(t, "tss"); int(st.Sys().(*syscall.Stat_t).Uid) != uid {
			t.Errorf("%s belongs to uid %d, want the directory's owner tss", name, st.Sys().(*syscall.Stat_t).Uid)
		}
	}

	withBlobs := e.stateDir("with-blobs", "tss")
	if err := os.WriteFile(filepath.Join(withBlobs, "permall.a.sealed"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name, mode, dir, blob string
		kind                  error
		says                  string
	}{
		{"a record that does not verify", "adopt", e.stateDir("t1", "tss"), tampered, errdefs.ErrPermissionDenied, "does not verify"},
		{"a directory the caller does not hold", "adopt-unlocked", e.stateDir("t2", "tss"), blob, errdefs.ErrPermissionDenied, "does not hold the lock"},
		{"a directory with sealed state", "adopt", withBlobs, blob, errdefs.ErrFailedPrecondition, "already holds sealed state"},
		{"a TPM this host is not admitted to", "adopt", e.stateDir("t3", "tss"), foreign, errdefs.ErrPermissionDenied, "\nguardians: host:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cmd := e.helperCmd("tss", tt.mode, tt.dir)
			cmd.Env = append(cmd.Env, helperBlobEnv+"="+tt.blob)
			out, _ := cmd.CombinedOutput()
			got := strings.TrimSpace(string(out))
			t.Log(got)
			if !strings.HasPrefix(got, "err "+tt.kind.Error()+":") || !strings.Contains(got, tt.says) {
				t.Errorf("got %q, want %v saying %q", got, tt.kind, tt.says)
			}
			if _, err := os.Stat(filepath.Join(tt.dir, state.ProtectorFile)); err == nil && tt.dir != withBlobs {
				t.Errorf("a refused adoption wrote %s", state.ProtectorFile)
			}
		})
	}
}
