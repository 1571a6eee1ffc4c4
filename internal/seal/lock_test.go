package seal

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// The lock helper runs in a child process, because POSIX locks never
// conflict within one process.
const helperEnv = "SEAL_LOCK_HELPER"

const exitLocked = 3

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(lockHelper(mode, os.Getenv("SEAL_LOCK_DIR")))
	}
	os.Exit(m.Run())
}

// lockHelper: "try" opens the store and exits (exitLocked if locked);
// "hold" opens it, prints "ready" and holds it until stdin closes.
func lockHelper(mode, dir string) int {
	s, err := Open(dir, Options{Key: testKey})
	if errors.Is(err, ErrLocked) {
		fmt.Fprintln(os.Stderr, err)
		return exitLocked
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Close()
	if mode == "hold" {
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
	}
	return 0
}

func helper(t *testing.T, mode, dir string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, "SEAL_LOCK_DIR="+dir)
	return cmd
}

func tryInChild(t *testing.T, dir string) (locked bool, stderr string) {
	t.Helper()
	cmd := helper(t, "try", dir)
	var errb strings.Builder
	cmd.Stderr = &errb
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return false, errb.String()
	case errors.As(err, &exit) && exit.ExitCode() == exitLocked:
		return true, errb.String()
	}
	t.Fatalf("lock helper: %v: %s", err, errb.String())
	return false, ""
}

func TestLockExcludesOtherProcess(t *testing.T) {
	e := newEnv(t)
	s := e.open(t, nil)
	locked, msg := tryInChild(t, e.dir)
	if !locked {
		t.Fatal("a second process opened a locked state directory")
	}
	want := fmt.Sprintf("state directory %s is in use by another TPM process (pid %d)", e.dir, os.Getpid())
	if !strings.Contains(msg, want) {
		t.Errorf("child error %q does not contain %q", msg, want)
	}

	// A second Open in this process is refused and must not drop the lock.
	if s2, err := Open(e.dir, Options{Key: testKey}); !errors.Is(err, ErrLocked) {
		if s2 != nil {
			s2.Close()
		}
		t.Fatalf("second Open in the same process = %v, want ErrLocked", err)
	}
	if locked, _ := tryInChild(t, e.dir); !locked {
		t.Fatal("a refused second Open released the lock")
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if locked, msg := tryInChild(t, e.dir); locked {
		t.Fatalf("lock still held after Close: %s", msg)
	}
}

func TestLockHeldByOtherProcess(t *testing.T) {
	e := newEnv(t)
	cmd := helper(t, "hold", e.dir)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("helper did not get ready: %q, %v", line, err)
	}

	_, err = Open(e.dir, Options{Key: testKey})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("Open while another process holds the lock = %v, want ErrLocked", err)
	}
	if !strings.Contains(err.Error(), "(pid "+strconv.Itoa(cmd.Process.Pid)+")") {
		t.Errorf("error %q does not name the holder's pid %d", err, cmd.Process.Pid)
	}

	// The lock is a plain whole-file fcntl write lock on .lock, like swtpm's.
	f, err := os.OpenFile(filepath.Join(e.dir, LockName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	lk := syscall.Flock_t{Type: syscall.F_WRLCK}
	if err := syscall.FcntlFlock(f.Fd(), syscall.F_GETLK, &lk); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if lk.Type != syscall.F_WRLCK || int(lk.Pid) != cmd.Process.Pid || lk.Start != 0 || lk.Len != 0 {
		t.Errorf("F_GETLK = %+v, want a whole-file write lock by pid %d", lk, cmd.Process.Pid)
	}

	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
	s, err := Open(e.dir, Options{Key: testKey})
	if err != nil {
		t.Fatalf("Open after the holder exited: %v", err)
	}
	s.Close()
}
