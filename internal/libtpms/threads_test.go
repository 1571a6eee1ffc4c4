package libtpms

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"vtpm/internal/sandbox"
	"vtpm/internal/testutil"
)

// threadsChildEnv makes the test binary a child that runs one all-threads
// check and prints "ok" or what went wrong: the effects are irreversible.
const threadsChildEnv = "VTPM_LIBTPMS_THREADS_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(threadsChildEnv); v != "" {
		what, arg, _ := strings.Cut(v, ":")
		fmt.Print(threadsChild(what, arg))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// parkedThreads starts n goroutines, each locked to its own OS thread, that
// run the functions sent on the returned channels until they are closed.
func parkedThreads(n int) []chan func() {
	var ready sync.WaitGroup
	chans := make([]chan func(), n)
	for i := range chans {
		chans[i] = make(chan func())
		ready.Add(1)
		go func(c chan func()) {
			runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
			ready.Done()
			for f := range c {
				f()
			}
		}(chans[i])
	}
	ready.Wait()
	return chans
}

// onEach runs f on each parked thread and returns the first error.
func onEach(chans []chan func(), f func() error) error {
	errs := make(chan error, len(chans))
	for _, c := range chans {
		c <- func() { errs <- f() }
	}
	var first error
	for range chans {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// everyThread checks field of /proc/self/task/*/status on every thread.
func everyThread(field, want string) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join("/proc/self/task", t.Name(), "status"))
		if errors.Is(err, os.ErrNotExist) {
			continue // ended meanwhile
		} else if err != nil {
			return err
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, field+":"); ok && strings.TrimSpace(v) != want {
				return fmt.Errorf("thread %s: %s %s, want %s", t.Name(), field, strings.TrimSpace(v), want)
			}
		}
	}
	return nil
}

func threadsChild(what, arg string) string {
	parked := parkedThreads(8)
	// Threads that come and go during the call: each locked goroutine that
	// returns takes its thread with it.
	stop := make(chan struct{})
	var churn sync.WaitGroup
	churn.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			var w sync.WaitGroup
			w.Go(func() { runtime.LockOSThread() })
			w.Wait()
		}
	})
	var err error
	switch what {
	case "no_new_privs":
		err = AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0)
		close(stop)
		churn.Wait()
		if err == nil {
			err = everyThread("NoNewPrivs", "1")
		}
	case "landlock":
		// The sandbox confines the running threads in place with
		// AllThreadsSyscall: threads started before confinement cannot
		// write outside the allowed directory.
		sandbox.UseAllThreads(AllThreadsSyscall)
		in, out := filepath.Join(arg, "in"), filepath.Join(arg, "out")
		p := &sandbox.Policy{Isolation: sandbox.Preferred, WriteDirs: []string{in}}
		var sb *sandbox.Sandbox
		sb, err = sandbox.Enter(p, slog.New(slog.NewTextHandler(io.Discard, nil)))
		close(stop)
		churn.Wait()
		if err == nil && sb.Method() != sandbox.MethodAllThreads && sb.Method() != sandbox.MethodTSYNC {
			err = fmt.Errorf("entered Landlock by %q, want in place", sb.Method())
		}
		if err == nil {
			err = everyThread("NoNewPrivs", "1")
		}
		if err == nil {
			err = onEach(parked, func() error {
				tid := unix.Gettid()
				if err := os.WriteFile(filepath.Join(in, fmt.Sprint(tid)), nil, 0o600); err != nil {
					return fmt.Errorf("thread %d, inside: %w", tid, err)
				}
				if err := os.WriteFile(fmt.Sprintf("%s-%d", out, tid), nil, 0o600); !errors.Is(err, unix.EACCES) {
					return fmt.Errorf("thread %d, outside: %v, want %v", tid, err, unix.EACCES)
				}
				return nil
			})
		}
	default:
		err = fmt.Errorf("unknown check %q", what)
	}
	for _, c := range parked {
		close(c)
	}
	if err != nil {
		return err.Error()
	}
	return "ok"
}

// TestAllThreadsSyscall runs system calls on every thread of a child
// process, including threads that start and end meanwhile, and checks the
// effect on each.
func TestAllThreadsSyscall(t *testing.T) {
	tests := []struct {
		what string
		skip func() error
	}{
		{"no_new_privs", nil},
		{"landlock", func() error { _, err := sandbox.LandlockABI(); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.what, func(t *testing.T) {
			if tc.skip != nil {
				if err := tc.skip(); err != nil {
					testutil.Missing(t, "%v", err)
				}
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), threadsChildEnv+"="+tc.what+":"+t.TempDir())
			out, err := cmd.CombinedOutput()
			if err != nil || string(out) != "ok" {
				t.Errorf("child: %v: %s", err, out)
			}
		})
	}
}

// TestAllThreadsSyscallError: a call every thread refuses reports the error.
func TestAllThreadsSyscallError(t *testing.T) {
	err := AllThreadsSyscall(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 2, 0) // only 1 is valid
	if !errors.Is(err, syscall.EINVAL) {
		t.Errorf("prctl(PR_SET_NO_NEW_PRIVS, 2) on every thread: %v, want EINVAL", err)
	}
}
