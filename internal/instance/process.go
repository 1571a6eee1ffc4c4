package instance

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"syscall"

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
// reports with [NotifyParent].
func Daemonize(stderr io.Writer) error {
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
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", daemonEnv, 3))
	cmd.ExtraFiles = []*os.File{w}
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

// NotifyParent tells a waiting [Daemonize] parent that the vTPM serves, and
// detaches the copy from the parent's terminal. Outside a copy it does
// nothing.
func NotifyParent() {
	if !InDaemon() {
		return
	}
	f := os.NewFile(3, "notify")
	f.Write([]byte{1})
	f.Close()
	os.Unsetenv(daemonEnv)
	if devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0); err == nil {
		for _, fd := range []int{0, 1, 2} {
			syscall.Dup2(int(devnull.Fd()), fd)
		}
		devnull.Close()
	}
}
