package sandbox

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"vtpm/internal/testutil"
)

// childEnv makes the test binary a child that installs the filter and tries
// one operation (see TestMain).
const childEnv = "VTPM_SANDBOX_TEST_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(childEnv); v != "" {
		action, op, _ := strings.Cut(v, ":")
		fmt.Print(filterChild(action, op))
		os.Exit(0)
	}
	if dir := os.Getenv(enterChildEnv); dir != "" {
		fmt.Print(enterChild(dir))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// filterChild installs the filter with action, runs op and returns "ok" or
// the error; a killed child returns nothing.
func filterChild(action, op string) string {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return "prctl: " + err.Error()
	}
	if err := installSeccomp(action); err != nil {
		return "install: " + err.Error()
	}
	var err error
	switch op {
	case "socket inet":
		var fd int
		if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0); err == nil {
			unix.Close(fd)
		}
	case "socket unix":
		var fd int
		if fd, err = unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0); err == nil {
			unix.Close(fd)
		}
	case "mmap exec":
		var b []byte
		if b, err = unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_EXEC, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err == nil {
			unix.Munmap(b)
		}
	case "mmap rw":
		var b []byte
		if b, err = unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err == nil {
			unix.Munmap(b)
		}
	case "fork":
		// clone without CLONE_THREAD makes a process. Were it allowed, the
		// child would leave at once.
		r, _, errno := unix.RawSyscall6(unix.SYS_CLONE, uintptr(unix.SIGCHLD), 0, 0, 0, 0, 0)
		if errno != 0 {
			err = errno
		} else if r == 0 {
			unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
		}
	case "clone3":
		_, _, errno := unix.Syscall(unix.SYS_CLONE3, 0, 0, 0)
		if errno != 0 {
			err = errno
		}
	case "execve":
		err = syscall.Exec("/bin/true", []string{"true"}, nil)
	case "ptrace":
		// A request about a process that does not exist: it reaches the
		// kernel (ESRCH) when allowed, and has no effect. PTRACE_TRACEME
		// would leave this child stopped at its next signal, its parent
		// never acting as a tracer.
		_, _, errno := unix.Syscall(unix.SYS_PTRACE, unix.PTRACE_PEEKUSR, 1<<22, 0)
		if errno != 0 && errno != unix.ESRCH {
			err = errno
		}
	case "threads and files":
		// New OS threads (each goroutine keeps its own), files written,
		// synced, renamed and removed, locked memory.
		dir, derr := os.MkdirTemp("", "vtpm-filter-")
		if derr != nil {
			return derr.Error()
		}
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for i := range 8 {
			wg.Go(func() {
				runtime.LockOSThread() // never unlocked: the thread is used once
				p := filepath.Join(dir, fmt.Sprint(i))
				if err := os.WriteFile(p+".tmp", []byte("x"), 0o600); err != nil {
					errs <- err
					return
				}
				if err := os.Rename(p+".tmp", p); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		err = <-errs
		if err == nil {
			var l *Locked
			if l, err = LockedBytes(64); err == nil {
				l.Wipe()
			}
		}
		if err == nil {
			err = os.RemoveAll(dir)
		}
	default:
		return "unknown op " + op
	}
	if err != nil {
		return err.Error()
	}
	return "ok"
}

// TestFilter installs the seccomp filter in a child process and checks what
// each operation does under it.
func TestFilter(t *testing.T) {
	if err := SeccompAvailable(); err != nil {
		testutil.Missing(t, "%v", err)
	}
	const killed = "killed by SIGSYS"
	eperm, enosys := unix.EPERM.Error(), unix.ENOSYS.Error()
	tests := []struct {
		action, op string
		want       string // "ok", an error ending, or killed
	}{
		{SeccompKill, "socket inet", eperm},
		{SeccompKill, "socket unix", eperm},
		{SeccompKill, "mmap exec", eperm},
		{SeccompKill, "mmap rw", "ok"},
		{SeccompKill, "fork", eperm},
		{SeccompKill, "clone3", enosys},
		{SeccompKill, "execve", killed},
		{SeccompKill, "ptrace", killed},
		{SeccompKill, "threads and files", "ok"},
		{SeccompLog, "socket inet", "ok"},
		{SeccompLog, "ptrace", "ok"},
		{"", "execve", killed}, // the default is kill, as swtpm's
	}
	for _, tc := range tests {
		t.Run(tc.action+" "+tc.op, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), childEnv+"="+tc.action+":"+tc.op)
			out, err := cmd.Output()
			got := string(out)
			var ee *exec.ExitError
			if errors.As(err, &ee) && ee.Sys().(syscall.WaitStatus).Signal() == syscall.SIGSYS {
				got = killed
			} else if err != nil {
				t.Fatalf("child: %v: %s", err, out)
			}
			if got != tc.want && !(tc.want != "ok" && tc.want != killed && strings.HasSuffix(got, tc.want)) {
				t.Errorf("%s under action %q: %q, want %q", tc.op, tc.action, got, tc.want)
			}
		})
	}
}

func TestSeccompActions(t *testing.T) {
	for _, a := range []string{"", SeccompKill, SeccompLog} {
		if _, _, err := seccompActions(a); err != nil {
			t.Errorf("action %q: %v", a, err)
		}
	}
	if _, _, err := seccompActions("trap"); err == nil || !strings.Contains(err.Error(), "want kill, log or none") {
		t.Errorf("action trap: %v, want an error naming the choices", err)
	}
}

func vmLck(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmLck:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func TestLockedBytes(t *testing.T) {
	before := vmLck(t)
	l, err := LockedBytes(32)
	if err != nil {
		testutil.Missing(t, "cannot lock memory here: %v", err)
	}
	if len(l.Bytes()) != 32 {
		t.Fatalf("len %d, want 32", len(l.Bytes()))
	}
	if during := vmLck(t); during == before {
		t.Errorf("VmLck stays %s with a locked page", during)
	}
	copy(l.Bytes(), "key material")
	l.Wipe()
	if l.Bytes() != nil {
		t.Error("Bytes after Wipe is not nil")
	}
	if after := vmLck(t); after != before {
		t.Errorf("VmLck %s after Wipe, want %s", after, before)
	}
	l.Wipe() // twice is harmless
	var nilLocked *Locked
	nilLocked.Wipe()
}

// TestKeep moves a key into locked memory and wipes the original.
func TestKeep(t *testing.T) {
	s := &Sandbox{policy: &Policy{Isolation: Preferred}}
	key := []byte("0123456789abcdef0123456789abcdef")
	kept, err := s.Keep(key)
	if err != nil {
		testutil.Missing(t, "cannot lock memory here: %v", err)
	}
	if string(kept) != "0123456789abcdef0123456789abcdef" {
		t.Errorf("kept %q", kept)
	}
	if string(key) != string(make([]byte, 32)) {
		t.Errorf("the original is not wiped: %q", key)
	}
	if &kept[0] == &key[0] {
		t.Error("Keep returned the original memory")
	}
	s.Close()
	if len(s.keys) != 0 {
		t.Error("Close left locked keys")
	}
}

// TestIsolationHasNoImplicitDefault: the empty policy is not a policy;
// front ends say which one they mean.
func TestIsolationHasNoImplicitDefault(t *testing.T) {
	for _, tt := range []struct {
		in      string
		want    Isolation
		wantErr bool
	}{
		{"required", Required, false},
		{"preferred", Preferred, false},
		{"none", None, false},
		{"", "", true},
		{"sometimes", "", true},
	} {
		got, err := ParseIsolation(tt.in)
		if got != tt.want || (err != nil) != tt.wantErr {
			t.Errorf("ParseIsolation(%q) = %q, %v; want %q, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
	if _, err := Enter(&Policy{}, nil); err == nil || !strings.Contains(err.Error(), "want required, preferred or none") {
		t.Errorf("Enter with no isolation policy: %v, want an error naming the choices", err)
	}
}

// TestRunAsFailsClosed: a --runas user that is root, or whose ids do not
// parse, is an error, never uid 0.
func TestRunAsFailsClosed(t *testing.T) {
	tests := []struct {
		name, user, uid, gid string
		wantUID, wantGID     int
		wantErr              string
	}{
		{"unprivileged", "nobody", "65534", "65534", 65534, 65534, ""},
		{"root by uid", "root", "0", "0", -1, -1, "that is root (uid 0)"},
		{"root group", "wheelish", "1000", "0", -1, -1, "gid 0"},
		{"uid not a number", "odd", "S-1-5-21", "100", -1, -1, `uid "S-1-5-21" is not a number`},
		{"empty uid", "odd", "", "100", -1, -1, "is not a number"},
		{"gid not a number", "odd", "1000", "staff", -1, -1, `gid "staff" is not a number`},
		{"negative uid", "odd", "-1", "100", -1, -1, "is not a number"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			uid, gid, err := runAsIDs(tc.user, tc.uid, tc.gid)
			if tc.wantErr == "" {
				if err != nil || uid != tc.wantUID || gid != tc.wantGID {
					t.Fatalf("runAsIDs = %d, %d, %v; want %d, %d", uid, gid, err, tc.wantUID, tc.wantGID)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "--runas "+tc.user) {
				t.Fatalf("runAsIDs = %v; want an error naming --runas %s and %q", err, tc.user, tc.wantErr)
			}
			if uid == 0 || gid == 0 {
				t.Errorf("a refused --runas returned uid %d gid %d", uid, gid)
			}
		})
	}
	for _, name := range []string{"root", "0", "no-such-user-vtpm-test"} {
		if uid, _, err := LookupUser(name); err == nil || uid == 0 {
			t.Errorf("LookupUser(%q) = uid %d, %v; want an error", name, uid, err)
		}
	}
}
