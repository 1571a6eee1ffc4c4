package sandbox

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"vtpm/internal/testutil"
)

// enterChildEnv makes the test binary a child that enters the sandbox with
// the all-threads call failing, so that it falls back to re-executing
// itself, and then checks its threads (see TestMain).
const enterChildEnv = "VTPM_SANDBOX_TEST_ENTER"

// enterChild prints its pid, then "ok" or what went wrong.
func enterChild(dir string) string {
	fmt.Printf("%d ", os.Getpid())
	// Threads that exist before Enter, in this image or the next.
	threads := make([]chan func(), 4)
	for i := range threads {
		threads[i] = make(chan func())
		started := make(chan struct{})
		go func(c chan func()) {
			runtime.LockOSThread()
			close(started)
			for f := range c {
				f()
			}
		}(threads[i])
		<-started
	}
	UseAllThreads(func(trap, a1, a2, a3 uintptr) error { return unix.ENOTSUP })
	in := filepath.Join(dir, "in")
	sb, err := Enter(&Policy{Isolation: Preferred, WriteDirs: []string{in}}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return err.Error()
	}
	if sb.Method() != MethodReexec {
		return fmt.Sprintf("entered Landlock by %q, want %q", sb.Method(), MethodReexec)
	}
	errs := make(chan error, len(threads))
	for _, c := range threads {
		c <- func() {
			tid := unix.Gettid()
			if err := os.WriteFile(filepath.Join(in, strconv.Itoa(tid)), nil, 0o600); err != nil {
				errs <- fmt.Errorf("thread %d, inside: %w", tid, err)
				return
			}
			outside := filepath.Join(dir, "out-"+strconv.Itoa(tid))
			if err := os.WriteFile(outside, nil, 0o600); !errors.Is(err, unix.EACCES) {
				errs <- fmt.Errorf("thread %d, outside: %v, want %v", tid, err, unix.EACCES)
				return
			}
			errs <- nil
		}
	}
	for range threads {
		if err := <-errs; err != nil {
			return err.Error()
		}
	}
	return "ok"
}

// TestEnterFallsBackToReexec: when the threads cannot be restricted in
// place, Enter re-executes the program (same pid) from a restricted thread,
// and every thread of the new image is confined.
func TestEnterFallsBackToReexec(t *testing.T) {
	if _, err := LandlockABI(); err != nil {
		testutil.Missing(t, "%v", err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), enterChildEnv+"="+t.TempDir())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v: %s", err, out)
	}
	// The pid printed before Enter and again by the re-executed image.
	f := strings.Fields(string(out))
	want := strconv.Itoa(cmd.Process.Pid)
	if len(f) != 3 || f[0] != want || f[1] != want || f[2] != "ok" {
		t.Errorf("child printed %q, want %q twice and ok", out, want)
	}
}
