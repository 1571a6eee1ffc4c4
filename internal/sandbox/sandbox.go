package sandbox

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/user"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"vtpm/internal/errdefs"
)

// Isolation is an isolation policy: what Enter does when the host lacks a
// part of the sandbox. It has no default of its own; each front end states
// its choice (the swtpm drop-in Preferred, a VM Required).
type Isolation string

// Isolation policies (--isolation).
const (
	Required  Isolation = "required"  // every part or the instance does not start
	Preferred Isolation = "preferred" // what the host offers; warnings for the rest
	None      Isolation = "none"      // no sandbox: debugging only
)

// ParseIsolation returns the policy named s.
func ParseIsolation(s string) (Isolation, error) {
	switch i := Isolation(s); i {
	case Required, Preferred, None:
		return i, nil
	}
	return "", errdefs.New(errdefs.ErrInvalidArgument, "--isolation %s: want required, preferred or none", s)
}

// Policy is what an instance may do once confined.
type Policy struct {
	Isolation Isolation
	Seccomp   string // SeccompKill (""), SeccompLog, SeccompNone

	// WriteDirs may be written beneath: files and directories created,
	// written, renamed and removed. They are created (0700) if missing.
	WriteDirs []string
	// DirOwner, if set, owns the WriteDirs Enter creates (--runas: they are
	// created before privileges are dropped).
	DirOwner *[2]int
	// RuntimeDirs may get sockets and regular files (the pid file) and have
	// files removed, nothing else.
	RuntimeDirs []string
	// WriteFiles are existing files that may be opened for writing: the log
	// file, the host TPM device, /dev/null.
	WriteFiles []string
	// BindTCP are the TCP ports the instance may listen on.
	BindTCP []uint16
}

// LookupUser resolves a --runas user (a name or a numeric uid) to its uid
// and primary gid. It fails closed: an unknown user, ids that do not parse,
// and root (uid or gid 0: a privilege drop to root drops nothing) are
// errors, never uid 0.
func LookupUser(name string) (uid, gid int, err error) {
	u, err := user.Lookup(name)
	if err != nil {
		if u, err = user.LookupId(name); err != nil {
			return -1, -1, fmt.Errorf("--runas %s: no such user", name)
		}
	}
	return runAsIDs(name, u.Uid, u.Gid)
}

// runAsIDs parses a --runas user's ids, failing closed.
func runAsIDs(name, uidStr, gidStr string) (uid, gid int, err error) {
	uid, uerr := strconv.Atoi(uidStr)
	gid, gerr := strconv.Atoi(gidStr)
	switch {
	case uerr != nil || uid < 0:
		return -1, -1, fmt.Errorf("--runas %s: uid %q is not a number; refusing to change user", name, uidStr)
	case gerr != nil || gid < 0:
		return -1, -1, fmt.Errorf("--runas %s: gid %q is not a number; refusing to change user", name, gidStr)
	case uid == 0:
		return -1, -1, fmt.Errorf("--runas %s: that is root (uid 0), which drops no privileges; give an unprivileged user (e.g. tss or nobody)", name)
	case gid == 0:
		return -1, -1, fmt.Errorf("--runas %s: its group is root's (gid 0); give a user with an unprivileged primary group", name)
	}
	return uid, gid, nil
}

// stageEnv tells the re-executed image that it was born in the Landlock
// domain; its value is the Landlock ABI applied.
const stageEnv = "VTPM_SANDBOX_LANDLOCK"

// Sandbox is the confinement of this process.
type Sandbox struct {
	policy   *Policy
	log      *slog.Logger
	landlock int      // Landlock ABI the process runs under; 0 = none
	method   string   // how Landlock was entered (Method*)
	missing  []string // parts the host could not provide, each with its fix
	keys     []*Locked
	sealed   bool
}

// MissingError is returned when the policy requires isolation and part of
// it is missing. Its message names each missing part and its fix; it
// matches errdefs.ErrFailedPrecondition.
type MissingError struct{ Missing []string }

func (e *MissingError) Error() string {
	return "isolation is required, but the host cannot provide: " + strings.Join(e.Missing, "; ")
}

// Is matches errdefs.ErrFailedPrecondition.
func (e *MissingError) Is(target error) bool { return target == errdefs.ErrFailedPrecondition }

// Remedies: the host's state, or running with the isolation it has.
func (e *MissingError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Do(errdefs.ActionDoctor).WithNote("see the host's state"),
		errdefs.Do(errdefs.ActionIsolationPreferred).WithNote("or start with it to run without"),
	}
}

// Enter confines the process to p's file system rules, so it must be called
// before anything the rules would refuse and before anything that a
// re-executed program could not repeat: nothing read from passed
// descriptors, no sockets bound. It restricts every thread of the running
// process in place (see restrictAll); where the kernel and the program
// cannot do that, it re-executes the program (same arguments, same
// inherited descriptors, same pid) from a restricted thread, and then
// returns only in the new image, or when confining failed. Either way the
// process is also made non-dumpable and no_new_privs is set.
//
// With Isolation Required, a part the host does not provide is an error
// (*MissingError); with Preferred it is logged as a warning.
func Enter(p *Policy, log *slog.Logger) (*Sandbox, error) {
	s := &Sandbox{policy: p, log: log}
	switch p.Isolation {
	case Preferred, Required:
	case None:
		return s, nil
	default:
		_, err := ParseIsolation(string(p.Isolation))
		return nil, err
	}
	if p.Seccomp == SeccompNone {
		s.missing = append(s.missing, "seccomp is turned off by --seccomp action=none; drop that option")
	} else if _, _, err := seccompActions(p.Seccomp); err != nil {
		return nil, err
	} else if err := SeccompAvailable(); err != nil {
		s.missing = append(s.missing, "seccomp: "+err.Error())
	}
	if v := os.Getenv(stageEnv); v != "" {
		os.Unsetenv(stageEnv)
		s.landlock, _ = strconv.Atoi(v)
		s.method = MethodReexec
	} else if abi, err := LandlockABI(); err != nil {
		s.missing = append(s.missing, "Landlock: "+err.Error()+"; upgrade to Linux 5.13 or newer with landlock in lsm=")
	} else if err := s.confine(abi); err != nil {
		s.missing = append(s.missing, "Landlock: "+err.Error())
	}
	// Process-wide, or (no_new_privs) for this thread in an image without
	// Landlock; after execve both need setting again.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		s.missing = append(s.missing, fmt.Sprintf("no_new_privs: prctl: %v", err))
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		s.missing = append(s.missing, fmt.Sprintf("not dumpable: prctl: %v", err))
	}
	if err := s.check(); err != nil {
		return nil, err
	}
	return s, nil
}

// check applies the policy to what is missing so far.
func (s *Sandbox) check() error {
	if len(s.missing) == 0 {
		return nil
	}
	if s.policy.Isolation == Required {
		return &MissingError{Missing: s.missing}
	}
	for _, m := range s.missing {
		s.log.Warn("running with less isolation than vtpm can provide", "missing", m)
	}
	s.missing = nil
	return nil
}

// confine applies Landlock to the whole process: in place when it can, else
// by re-executing the program, in which case it returns only on failure.
func (s *Sandbox) confine(abi int) error {
	if err := prepareDirs(s.policy); err != nil {
		return err
	}
	fd, err := newRuleset(s.policy, abi)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	method, err := restrictAll(fd, abi)
	if err == nil {
		s.landlock, s.method = abi, method
		s.log.Debug("entered Landlock", "abi", abi, "method", method)
		return nil
	}
	// Slower (a second program start), not weaker.
	s.log.Info("entering Landlock by re-executing the program", "reason", err)
	return s.reexec(fd, abi)
}

// prepareDirs creates the writable directories, which a Landlock rule needs.
func prepareDirs(p *Policy) error {
	for _, d := range p.WriteDirs {
		_, err := os.Stat(d)
		created := errors.Is(err, fs.ErrNotExist)
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("create %s before confining the process: %w", d, err)
		}
		if created && p.DirOwner != nil {
			// Created here, before --runas drops privileges: the user needs it.
			if err := os.Chown(d, p.DirOwner[0], p.DirOwner[1]); err != nil {
				return fmt.Errorf("hand %s to the --runas user: %w", d, err)
			}
		}
	}
	return nil
}

// reexec restricts one locked thread with the ruleset fd and executes the
// program again from it. It returns only on failure.
func (s *Sandbox) reexec(fd, abi int) error {
	// /proc/self/exe is this very image, even if the file was replaced since.
	exe := "/proc/self/exe"
	if _, err := os.Stat(exe); err != nil {
		if exe, err = os.Executable(); err != nil {
			return fmt.Errorf("find this program to re-execute it: %w", err)
		}
	}
	env := append(os.Environ(), stageEnv+"="+strconv.Itoa(abi))
	errc := make(chan error, 1)
	go func() {
		// This thread is restricted for good: it is never unlocked, so if
		// execve fails the Go runtime ends the thread with the goroutine.
		runtime.LockOSThread()
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			errc <- fmt.Errorf("no_new_privs: %w", err)
			return
		}
		if err := restrictThread(fd); err != nil {
			errc <- err
			return
		}
		err := syscall.Exec(exe, os.Args, env)
		errc <- fmt.Errorf("re-execute %s inside the Landlock domain: %w", exe, err)
	}()
	return <-errc
}

// Seal installs the seccomp filter on every thread. Call it once the
// instance has done everything that needs more: its sockets listen, its
// state is open, its pid file is written.
func (s *Sandbox) Seal() error {
	if s == nil || s.sealed || s.policy.Isolation == None {
		return nil
	}
	s.sealed = true
	if s.policy.Seccomp != SeccompNone && SeccompAvailable() == nil {
		if err := installSeccomp(s.policy.Seccomp); err != nil {
			s.missing = append(s.missing, "seccomp: "+err.Error())
		}
	}
	return s.check()
}

// Keep moves key material into locked memory: it returns a locked copy of
// key and wipes key. Close wipes the copy. When memory cannot be locked,
// Required fails and Preferred keeps key where it is (with a warning).
func (s *Sandbox) Keep(key []byte) ([]byte, error) {
	if s == nil || s.policy.Isolation == None || len(key) == 0 {
		return key, nil
	}
	l, err := LockedBytes(len(key))
	if err != nil {
		s.missing = append(s.missing, "key material in locked memory: "+err.Error())
		return key, s.check()
	}
	copy(l.Bytes(), key)
	clear(key)
	s.keys = append(s.keys, l)
	return l.Bytes(), nil
}

// Close wipes the key material Keep holds. Nothing may use it afterwards.
func (s *Sandbox) Close() {
	if s == nil {
		return
	}
	for _, l := range s.keys {
		l.Wipe()
	}
	s.keys = nil
}

// Method says how the process entered Landlock (MethodTSYNC,
// MethodAllThreads, MethodReexec), "" if it did not.
func (s *Sandbox) Method() string {
	if s == nil {
		return ""
	}
	return s.method
}

// Landlock is the Landlock ABI version the process is confined with, 0 if none.
func (s *Sandbox) Landlock() int {
	if s == nil {
		return 0
	}
	return s.landlock
}

// KeyMemory applies the policy to key material held elsewhere (by the key
// broker, the sealed store) whose memory could not be locked: lockErr is
// that memory's secret.Bytes.LockErr. Required fails; Preferred warns.
func (s *Sandbox) KeyMemory(lockErr error) error {
	if s == nil || lockErr == nil || s.policy.Isolation == None {
		return nil
	}
	s.missing = append(s.missing, "key material in locked memory: "+lockErr.Error())
	return s.check()
}
