package vm

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/hostcheck"
)

// qemuStartTimeout bounds how long QEMU may take to set the machine up
// and answer on its monitor.
const qemuStartTimeout = 2 * time.Minute

// qemuAccessProblems says which of the files QEMU opens by name (the
// kernel and initrd; everything else is handed over as descriptors) the
// QEMU user cannot read.
func qemuAccessProblems(v *VM) []error {
	c := v.Config
	name, uid, gid, err := hostcheck.QEMUUser(c.QEMUUser)
	if err != nil {
		return []error{err}
	}
	if name == "" {
		return nil
	}
	var probs []error
	for _, f := range []struct{ what, path string }{{"kernel", v.File(c.Kernel)}, {"initrd", v.File(c.Initrd)}} {
		if f.path == "" {
			continue
		}
		if err := readableBy(f.path, uid, gid); err != nil {
			probs = append(probs, errdefs.Wrap(errdefs.ErrPermissionDenied, err, "QEMU runs as %s, who cannot read the %s %s", name, f.what, f.path).
				With(errdefs.Advise("make it readable by others (chmod o+r, and o+x on its directories), or set qemu_user in %s", ConfigFile)))
		}
	}
	return probs
}

// readableBy checks by mode bits that uid (group gid) can reach and read
// path.
func readableBy(path string, uid, gid int) error {
	can := func(p string, bit os.FileMode) error {
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		s := st.Sys().(*syscall.Stat_t)
		m := st.Mode().Perm()
		ok := false
		switch {
		case int(s.Uid) == uid:
			ok = m&(bit<<6) != 0
		case int(s.Gid) == gid:
			ok = m&(bit<<3) != 0
		default:
			ok = m&bit != 0
		}
		if !ok {
			return fmt.Errorf("%s (mode %04o, uid %d, gid %d)", p, m, s.Uid, s.Gid)
		}
		return nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	for d := filepath.Dir(abs); ; d = filepath.Dir(d) {
		if err := can(d, 0o1); err != nil {
			return err
		}
		if d == "/" {
			break
		}
	}
	return can(abs, 0o4)
}

// startQEMU runs QEMU for v as the VM's QEMU user (when this process is
// root), under hostcheck.QEMUSandbox, with the files and sockets it needs handed
// over as descriptors. Headless, QEMU is detached and startQEMU returns
// its pid once its monitor answers; with Console it returns when the VM
// has stopped.
func (h *Registry) startQEMU(ctx context.Context, v *VM, r runPaths, accel string, o StartOptions, serialLog string, qlog *os.File) (int, error) {
	cred, err := hostcheck.QEMUCredential(v.Config.QEMUUser, accel)
	if err != nil {
		return 0, err
	}
	fio := &fdIO{}
	defer fio.close()
	logf, err := fio.log(serialLog)
	if err != nil {
		return 0, fmt.Errorf("the serial log: %w", err)
	}
	var serial string
	switch {
	case o.Console:
		serial = "stdio,id=ser0,signal=on,logfile=" + logf
	case o.SerialSocket != "":
		sock, err := fio.socket(o.SerialSocket, true)
		if err != nil {
			return 0, fmt.Errorf("the serial console's socket: %w", err)
		}
		serial = "socket,id=ser0," + sock + ",server=on,wait=off,logfile=" + logf
	default:
		serial = "file,id=ser0,path=" + logf
	}
	args, err := qemuArgs(v, r, accel, serial, fio)
	if err != nil {
		return 0, err
	}
	if o.incoming {
		args = incomingArgs(args, v.Config, o.machine)
	}
	args = append(fio.args, args...)
	who := "this user"
	if cred != nil {
		who = fmt.Sprintf("uid %d", cred.Uid)
	}
	fmt.Fprintf(qlog, "+ (as %s) %s %s\n", who, hostcheck.QEMU, strings.Join(args, " "))
	cmd := exec.Command(hostcheck.QEMU, args...)
	cmd.Dir = "/"
	cmd.ExtraFiles = fio.files
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setsid: !o.Console}
	if o.Console {
		return h.runQEMUConsole(ctx, v, r, cmd, fio, o, qlog)
	}
	// QEMU outlives this process: its output goes straight to the log.
	cmd.Stdout, cmd.Stderr = qlog, qlog
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("QEMU did not start: %w", err)
	}
	fio.close()
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	if err := os.WriteFile(r.QEMUPid, []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
		cmd.Process.Kill()
		return 0, err
	}
	if err := waitMonitor(ctx, r.QMP, exited); err != nil {
		cmd.Process.Kill()
		return 0, fmt.Errorf("QEMU did not start: %v: %s (full log: %s)", err, qemuErrors(qlog.Name()), qlog.Name())
	}
	return pid, nil
}

func (h *Registry) runQEMUConsole(ctx context.Context, v *VM, r runPaths, cmd *exec.Cmd, fio *fdIO, o StartOptions, qlog *os.File) (int, error) {
	var errBuf strings.Builder
	cmd.Stdin, cmd.Stdout = o.Stdin, o.Stdout
	cmd.Stderr = io.MultiWriter(qlog, &errBuf)
	// Ctrl-C goes to QEMU (signal=on), which stops the VM; this process
	// stays to see it through.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT)
	defer signal.Stop(sigs)
	err := cmd.Start()
	// QEMU holds the descriptors now; the vTPM sees QEMU's exit only once
	// no copy of its control connection is left here.
	fio.close()
	if err == nil {
		os.WriteFile(r.QEMUPid, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600)
		err = cmd.Wait()
	}
	if err != nil && ctx.Err() == nil && errBuf.Len() > 0 {
		err = fmt.Errorf("%w: %s", err, strings.TrimSpace(errBuf.String()))
	}
	h.afterQEMU(ctx, v, r)
	if err != nil {
		return 0, fmt.Errorf("QEMU: %w (see %s)", err, qlog.Name())
	}
	return 0, nil
}

// waitMonitor waits until QEMU greets on its monitor socket, which it does
// once the machine is set up, or until QEMU exits.
func waitMonitor(ctx context.Context, path string, exited <-chan error) error {
	ready := make(chan error, 1)
	go func() {
		c, err := net.DialTimeout("unix", path, 5*time.Second)
		if err != nil {
			ready <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(qemuStartTimeout))
		_, err = bufio.NewReader(c).ReadString('\n')
		ready <- err
	}()
	select {
	case err := <-ready:
		if err == nil {
			return nil
		}
		// A monitor that hung up: QEMU is exiting; say how it ended.
		select {
		case e := <-exited:
			return fmt.Errorf("QEMU exited: %v", e)
		case <-time.After(2 * time.Second):
			return fmt.Errorf("QEMU's monitor: %w", err)
		}
	case err := <-exited:
		return fmt.Errorf("QEMU exited: %v", err)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// qemuErrors is what QEMU wrote to its log, without the command line.
func qemuErrors(log string) string {
	b, err := os.ReadFile(log)
	if err != nil {
		return ""
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if l != "" && !strings.HasPrefix(l, "+ ") {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

// incomingArgs makes QEMU's command line wait, paused, for a migration
// (started later with migrate-incoming, after its TLS credentials are in
// place) on the source's resolved machine type.
func incomingArgs(args []string, c *Config, machine string) []string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "-machine" && machine != "" {
			m := optEscape(machine)
			if c.SecureBoot {
				m += ",smm=on"
			}
			args[i+1] = m
		}
	}
	return append(args, "-incoming", "defer", "-S")
}
