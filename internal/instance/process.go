package instance

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"vtpm/internal/swtpm"
)

// OpenLog honours --log file=|fd=,level=: it returns the instance's logger
// and what closes its file. Without --log only warnings go to stderr.
func OpenLog(l swtpm.Log, stderr io.Writer) (*slog.Logger, func(), error) {
	w, closer := stderr, func() {}
	level := slog.LevelWarn
	switch {
	case l.File != "" && l.File != "-":
		flag := os.O_WRONLY | os.O_CREATE | os.O_APPEND
		if l.Truncate {
			flag = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
		}
		f, err := os.OpenFile(l.File, flag, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("--log: open %s: %w", l.File, err)
		}
		w, closer = f, func() { f.Close() }
	case l.FD >= 0:
		w = os.NewFile(uintptr(l.FD), "log")
	}
	if l.Level >= 1 {
		level = slog.LevelInfo
	}
	if l.Level >= 5 {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
	if l.Prefix != "" {
		log = log.With("prefix", l.Prefix)
	}
	return log, closer, nil
}

// daemonEnv names, in a background copy, the descriptor on which it reports
// that it serves.
const daemonEnv = "VTPM_DAEMON_NOTIFY_FD"

// ErrDaemonExited reports a background copy that exited before it served;
// it has said why on stderr.
var ErrDaemonExited = errors.New("the background vTPM exited before it served")

// InDaemon reports whether this process is a background copy started by
// [Daemonize].
func InDaemon() bool { return os.Getenv(daemonEnv) != "" }

// Daemonize re-executes the program in a new session (Go cannot fork) and
// returns once the copy reports that it serves, as swtpm -d does. The copy
// reports with [NotifyParent]. Every descriptor this process inherited
// stays at its number, as across a fork, since the command line may name
// them (swtpm chardev --fd 3, --ctrl clientfd=, --key fd=): the readiness
// pipe goes above them, not onto one of them.
func Daemonize(stderr io.Writer) error {
	inherited := inheritedFDs()
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	cmd := exec.Command(exe, os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	// ExtraFiles[i] is descriptor 3+i; the gaps stay closed, and the
	// notification pipe comes after the inherited descriptors.
	notify := 3
	if len(inherited) > 0 {
		notify = inherited[len(inherited)-1] + 1
	}
	cmd.ExtraFiles = make([]*os.File, notify-3+1)
	for _, fd := range inherited {
		cmd.ExtraFiles[fd-3] = os.NewFile(uintptr(fd), "inherited")
	}
	cmd.ExtraFiles[notify-3] = w
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", daemonEnv, notify))
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("daemonize: %w", err)
	}
	w.Close()
	buf := make([]byte, 1)
	if n, _ := r.Read(buf); n == 1 {
		return nil
	}
	cmd.Wait()
	return ErrDaemonExited
}

// inheritedFDs lists, in order, the descriptors above stderr that this
// process inherited: open and not close-on-exec (Go opens its own with
// close-on-exec).
func inheritedFDs() []int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil
	}
	var fds []int
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 {
			continue
		}
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			fds = append(fds, fd)
		}
	}
	slices.Sort(fds)
	return fds
}

// NotifyParent tells a waiting [Daemonize] parent that the vTPM serves, and
// detaches the copy from the parent's terminal. Outside a copy it does
// nothing.
func NotifyParent() {
	if !InDaemon() {
		return
	}
	if fd, err := strconv.Atoi(os.Getenv(daemonEnv)); err == nil && fd > 2 {
		f := os.NewFile(uintptr(fd), "notify")
		f.Write([]byte{1})
		f.Close()
	}
	os.Unsetenv(daemonEnv)
	if devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0); err == nil {
		for _, fd := range []int{0, 1, 2} {
			syscall.Dup2(int(devnull.Fd()), fd)
		}
		devnull.Close()
	}
}
