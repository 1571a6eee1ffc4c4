package swtpm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm/subopt"
)

// Version is the swtpm release whose interface vtpm implements. Tools such as
// libvirt compare it to decide which options they may pass.
const Version = "0.7.1"

// Endpoint is a --ctrl or --server channel.
type Endpoint struct {
	Type       string // "unixio" or "tcp"
	Path       string
	Port       int
	BindAddr   string
	FD         int // listening socket passed in, or -1
	ClientFD   int // connected socket passed in (--ctrl only), or -1
	Mode       os.FileMode
	UID, GID   int // -1 = unchanged
	Disconnect bool
}

// Log is the --log option.
type Log struct {
	File     string // "" = none, "-" = none
	FD       int    // -1 = none
	Level    int
	Prefix   string
	Truncate bool
}

// Options are the options of `swtpm socket` as swtpm 0.7.1 accepts them.
type Options struct {
	TPM2         bool
	StateDir     string
	StateFile    string // file:// linear backend
	StateMode    os.FileMode
	StateModeSet bool
	Ctrl         *Endpoint
	Server       *Endpoint
	DataFD       int    // -f/--fd, or -1
	Chardev      bool   // swtpm chardev: the data channel carries one command per read (a character device or a socket)
	Device       string // swtpm chardev -c/--chardev: the character device to open
	Terminate    bool
	Daemon       bool
	PidFile      string
	PidFD        int // -1 = none
	Log          Log
	RejectLoc4   bool
	AllowSetLoc  bool
	NotNeedInit  bool
	Startup      string // "", "clear", "state", "deactivated", "none"
	Key          string // raw --key sub-options, parsed by statefile.ParseKeyOption
	MigrationKey string
	RunAs        string
	Seccomp      string // none, kill, log
	PrintCaps    bool
	PrintStates  bool
	ShowVersion  bool
	ShowHelp     bool
}

// Extensions are vtpm's own options on the `swtpm socket` command line,
// which swtpm does not have.
type Extensions struct {
	DataKey string // --data-key: the sealed-state data key (file= or fd=)
	// Isolation is --isolation; without it, sandbox.Preferred: a drop-in
	// for swtpm must start wherever swtpm did.
	Isolation     sandbox.Isolation
	AllowRollback bool // --allow-rollback: accept sealed state older than the last generation seen
	// StateFormat is the state format asked for, "sealed" or "swtpm"
	// (--tpmstate format=, else VTPM_STATE_FORMAT); "" lets the directory
	// decide (see state.ChooseExplicit).
	StateFormat string
}

// UsageError is a command-line error; swtpm prints it with the usage and exits 1.
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

func usagef(format string, a ...any) error { return &UsageError{fmt.Sprintf(format, a...)} }

// Parse parses the arguments that follow `swtpm socket` into swtpm's
// options and vtpm's extensions. getenv supplies TPM_PATH and TPM_PORT.
func Parse(args []string, getenv func(string) string) (*Options, *Extensions, error) {
	var (
		a        shared
		port, fd int
		server   string
	)
	c := &Options{DataFD: -1, PidFD: -1, Log: Log{FD: -1}}
	x := &Extensions{Isolation: sandbox.Preferred}
	fs := newFlagSet("swtpm socket", c, x, &a)
	fs.IntVarP(&port, "port", "p", -1, "")
	fs.IntVarP(&fd, "fd", "f", -1, "")
	fs.BoolVarP(&c.Terminate, "terminate", "t", false, "")
	fs.StringVar(&server, "server", "", "")
	if err := parseArgs(fs, args); err != nil {
		return nil, nil, err
	}
	if c.ShowHelp || c.ShowVersion || c.PrintCaps {
		return c, x, nil
	}
	if err := c.parseStateOptions(x, a.tpmstate, getenv); err != nil {
		return nil, nil, err
	}
	if c.PrintStates {
		return c, x, nil
	}
	var err error
	// Like the channels below, checked only when a TPM will run.
	if err = c.parseIsolationCtrl(x, a.isolation, a.ctrl); err != nil {
		return nil, nil, err
	}
	if server != "" {
		if c.Server, err = parseEndpoint("--server", server, false); err != nil {
			return nil, nil, err
		}
	}
	if fs.Changed("port") {
		if port < 0 || port > 65535 {
			return nil, nil, usagef("--port %d is not a port number", port)
		}
		if c.Server != nil {
			return nil, nil, usagef("--port and --server cannot be combined")
		}
		c.Server = &Endpoint{Type: "tcp", Port: port, BindAddr: "127.0.0.1", FD: -1, ClientFD: -1, UID: -1, GID: -1, Disconnect: true}
	}
	if fd >= 0 {
		if fd <= 2 {
			return nil, nil, usagef("--fd %d: file descriptors 0-2 cannot carry the data channel", fd)
		}
		c.DataFD, c.Terminate = fd, true
	}
	if c.Server != nil && c.Server.Type == "tcp" && c.Server.Port < 0 && c.Server.FD < 0 {
		p := getenv("TPM_PORT")
		if p == "" {
			return nil, nil, usagef("--server type=tcp needs port=, fd= or the TPM_PORT environment variable")
		}
		if c.Server.Port, err = parsePort("TPM_PORT", p); err != nil {
			return nil, nil, err
		}
	}
	if c.Server == nil && c.DataFD < 0 && c.Ctrl == nil {
		return nil, nil, usagef("no data channel: give --server, --port, --fd, or --ctrl type=unixio for a data fd passed by the client")
	}
	if err = c.parseRest(&a); err != nil {
		return nil, nil, err
	}
	return c, x, nil
}

// shared holds the raw values of the options `swtpm socket` and `swtpm
// chardev` share, parsed after the flags.
type shared struct {
	tpmstate, ctrl, pid, log, locality, flags, seccomp, isolation string
}

// newFlagSet returns the flag set of an interface (name), with the options
// socket and chardev share bound to c, x and a.
func newFlagSet(name string, c *Options, x *Extensions, a *shared) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.SortFlags = false
	fs.BoolVarP(&c.Daemon, "daemon", "d", false, "")
	fs.StringVar(&a.ctrl, "ctrl", "", "")
	fs.StringVar(&a.tpmstate, "tpmstate", "", "")
	fs.StringVar(&c.Key, "key", "", "")
	fs.StringVar(&c.MigrationKey, "migration-key", "", "")
	fs.StringVar(&x.DataKey, "data-key", "", "")
	fs.StringVar(&a.log, "log", "", "")
	fs.StringVar(&a.pid, "pid", "", "")
	fs.StringVar(&a.locality, "locality", "", "")
	fs.StringVar(&a.flags, "flags", "", "")
	fs.StringVarP(&c.RunAs, "runas", "r", "", "")
	fs.BoolVar(&c.TPM2, "tpm2", false, "")
	fs.StringVar(&a.seccomp, "seccomp", "", "")
	fs.StringVar(&a.isolation, "isolation", "", "")
	fs.BoolVar(&c.PrintCaps, "print-capabilities", false, "")
	fs.BoolVar(&c.PrintStates, "print-states", false, "")
	fs.BoolVarP(&c.ShowVersion, "version", "v", false, "")
	fs.BoolVarP(&c.ShowHelp, "help", "h", false, "")
	fs.BoolVar(&x.AllowRollback, "allow-rollback", false, "")
	return fs
}

// parseArgs parses args with swtpm's messages for an unknown option and a
// stray argument.
func parseArgs(fs *pflag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return usagef("%s", strings.Replace(err.Error(), "unknown flag", "unrecognized option", 1))
	}
	if fs.NArg() > 0 {
		return usagef("Unknown parameter '%s'", fs.Arg(0))
	}
	return nil
}

// parseStateOptions parses --tpmstate (or TPM_PATH) and the state format
// asked for; --print-states needs a location and nothing else.
func (c *Options) parseStateOptions(x *Extensions, tpmstate string, getenv func(string) string) error {
	format, err := c.parseState(tpmstate, getenv("TPM_PATH"))
	if err != nil {
		return err
	}
	if x.StateFormat, err = stateFormat(format, getenv); err != nil {
		return err
	}
	if c.PrintStates && c.StateDir == "" && c.StateFile == "" {
		return usagef("--print-states needs --tpmstate or TPM_PATH")
	}
	return nil
}

// parseIsolationCtrl parses --isolation and --ctrl, checked only when a TPM
// will run.
func (c *Options) parseIsolationCtrl(x *Extensions, isolation, ctrl string) (err error) {
	if isolation != "" { // --isolation= keeps the default
		if x.Isolation, err = sandbox.ParseIsolation(isolation); err != nil {
			return usagef("%v", err)
		}
	}
	if ctrl != "" {
		if c.Ctrl, err = parseEndpoint("--ctrl", ctrl, true); err != nil {
			return err
		}
	}
	return nil
}

// parseRest parses the options socket and chardev share after their data
// channels: --pid, --log, --locality, --flags and --seccomp, and checks
// that the state has a location.
func (c *Options) parseRest(a *shared) error {
	if err := c.parsePid(a.pid); err != nil {
		return err
	}
	if err := c.parseLog(a.log); err != nil {
		return err
	}
	if err := c.parseLocality(a.locality); err != nil {
		return err
	}
	if err := c.parseFlags(a.flags); err != nil {
		return err
	}
	if a.seccomp != "" {
		o, err := subopt.Parse(a.seccomp, "action")
		if err != nil {
			return usagef("--seccomp: %v", err)
		}
		switch a := o["action"]; a {
		case "none", "kill", "log":
			c.Seccomp = a
		default:
			return usagef("--seccomp: action=%q: want none, kill or log", a)
		}
	}
	if c.StateDir == "" && c.StateFile == "" {
		return usagef("no TPM state location: give --tpmstate dir=DIR or set TPM_PATH")
	}
	return nil
}

// parseState parses --tpmstate; it returns vtpm's format= sub-option.
func (c *Options) parseState(v, tpmPath string) (format string, err error) {
	if v == "" {
		c.StateDir = tpmPath
		c.StateMode = 0o640
		return "", nil
	}
	o, err := subopt.Parse(v, "dir", "mode", "backend-uri", "format")
	if err != nil {
		return "", usagef("--tpmstate: %v", err)
	}
	c.StateDir = o["dir"]
	if uri, ok := o["backend-uri"]; ok {
		if c.StateDir != "" {
			return "", usagef("--tpmstate: dir= and backend-uri= cannot be combined")
		}
		switch {
		case strings.HasPrefix(uri, "dir://"):
			c.StateDir = strings.TrimPrefix(uri, "dir://")
		case strings.HasPrefix(uri, "file://"):
			c.StateFile = strings.TrimPrefix(uri, "file://")
		default:
			return "", usagef("--tpmstate: backend-uri=%q: want dir://PATH or file://PATH", uri)
		}
	}
	if c.StateDir == "" && c.StateFile == "" {
		return "", usagef("--tpmstate: missing dir= or backend-uri=")
	}
	c.StateMode = 0o640
	if m, ok := o["mode"]; ok {
		if c.StateMode, err = parseMode("--tpmstate", m); err != nil {
			return "", err
		}
		c.StateModeSet = true
	}
	return o["format"], nil
}

func parseEndpoint(opt, v string, isCtrl bool) (*Endpoint, error) {
	allowed := []string{"type", "path", "port", "bindaddr", "ifname", "fd", "mode", "uid", "gid"}
	if isCtrl {
		allowed = append(allowed, "clientfd", "terminate")
	} else {
		allowed = append(allowed, "disconnect")
	}
	o, err := subopt.Parse(v, allowed...)
	if err != nil {
		return nil, usagef("%s: %v", opt, err)
	}
	e := &Endpoint{Type: o["type"], Port: -1, FD: -1, ClientFD: -1, UID: -1, GID: -1, Mode: 0o770, BindAddr: "127.0.0.1"}
	if e.Type == "" && !isCtrl {
		e.Type = "tcp" // swtpm's --server default
	}
	switch e.Type {
	case "unixio", "tcp":
	case "":
		return nil, usagef("%s: missing type=unixio or type=tcp", opt)
	default:
		return nil, usagef("%s: type=%q: want unixio or tcp", opt, e.Type)
	}
	e.Path = o["path"]
	if b, ok := o["bindaddr"]; ok {
		if b == "" {
			return nil, usagef("%s: bindaddr= is empty; give an address such as 127.0.0.1", opt)
		}
		e.BindAddr = b
	}
	if p, ok := o["port"]; ok {
		if e.Port, err = parsePort(opt+" port", p); err != nil {
			return nil, err
		}
	}
	for _, f := range []struct {
		name string
		dst  *int
	}{{"fd", &e.FD}, {"clientfd", &e.ClientFD}, {"uid", &e.UID}, {"gid", &e.GID}} {
		name, dst := f.name, f.dst
		if s, ok := o[name]; ok {
			n, err := strconv.Atoi(s)
			if err != nil || n < 0 {
				return nil, usagef("%s: %s=%q is not a non-negative number", opt, name, s)
			}
			*dst = n
		}
	}
	if m, ok := o["mode"]; ok {
		if e.Mode, err = parseMode(opt, m); err != nil {
			return nil, err
		}
	}
	if d, ok := o["disconnect"]; ok {
		if e.Disconnect, err = subopt.Bool("disconnect", d); err != nil {
			return nil, usagef("%s: %v", opt, err)
		}
	}
	switch {
	case e.Type == "unixio" && e.Path == "" && e.FD < 0 && e.ClientFD < 0:
		return nil, usagef("%s: type=unixio needs path=, fd= or clientfd=", opt)
	case e.Type == "tcp" && e.ClientFD >= 0:
		return nil, usagef("%s: clientfd= works only with type=unixio", opt)
	case isCtrl && e.Type == "tcp" && e.Port < 0 && e.FD < 0:
		return nil, usagef("%s: type=tcp needs port= or fd=", opt)
	}
	return e, nil
}

func (c *Options) parsePid(v string) error {
	if v == "" {
		return nil
	}
	o, err := subopt.Parse(v, "file", "fd")
	if err != nil {
		return usagef("--pid: %v", err)
	}
	c.PidFile = o["file"]
	if s, ok := o["fd"]; ok {
		if c.PidFD, err = strconv.Atoi(s); err != nil || c.PidFD < 0 {
			return usagef("--pid: fd=%q is not a file descriptor", s)
		}
	}
	if c.PidFile == "" && c.PidFD < 0 {
		return usagef("--pid: missing file= or fd=")
	}
	return nil
}

func (c *Options) parseLog(v string) error {
	if v == "" {
		return nil
	}
	o, err := subopt.Parse(v, "file", "fd", "level", "prefix", "truncate")
	if err != nil {
		return usagef("--log: %v", err)
	}
	c.Log.File, c.Log.Prefix = o["file"], o["prefix"]
	if s, ok := o["fd"]; ok {
		if c.Log.FD, err = strconv.Atoi(s); err != nil || c.Log.FD < 0 {
			return usagef("--log: fd=%q is not a file descriptor", s)
		}
	}
	if c.Log.File != "" || c.Log.FD >= 0 {
		c.Log.Level = 1
	}
	if s, ok := o["level"]; ok {
		if c.Log.Level, err = strconv.Atoi(s); err != nil || c.Log.Level < 0 {
			return usagef("--log: level=%q is not a number", s)
		}
	}
	if t, ok := o["truncate"]; ok {
		if c.Log.Truncate, err = subopt.Bool("truncate", t); err != nil {
			return usagef("--log: %v", err)
		}
	}
	return nil
}

func (c *Options) parseLocality(v string) error {
	if v == "" {
		return nil
	}
	o, err := subopt.Parse(v, "reject-locality-4", "allow-set-locality")
	if err != nil {
		return usagef("--locality: %v", err)
	}
	_, c.RejectLoc4 = o["reject-locality-4"]
	_, c.AllowSetLoc = o["allow-set-locality"]
	return nil
}

func (c *Options) parseFlags(v string) error {
	if v == "" {
		return nil
	}
	o, err := subopt.Parse(v, "not-need-init", "startup-clear", "startup-state", "startup-deactivated", "startup-none", "disable-auto-shutdown")
	if err != nil {
		return usagef("--flags: %v", err)
	}
	_, c.NotNeedInit = o["not-need-init"]
	for _, s := range []string{"clear", "state", "deactivated", "none"} {
		if _, ok := o["startup-"+s]; ok {
			if c.Startup != "" {
				return usagef("--flags: startup-%s and startup-%s exclude each other", c.Startup, s)
			}
			c.Startup = s
			c.NotNeedInit = c.NotNeedInit || s != "none"
		}
	}
	return nil
}

func parsePort(what, s string) (int, error) {
	p, err := strconv.Atoi(s)
	if err != nil || p < 0 || p > 65535 {
		return 0, usagef("%s: %q is not a port number", what, s)
	}
	return p, nil
}

func parseMode(opt, s string) (os.FileMode, error) {
	m, err := strconv.ParseUint(s, 8, 32)
	if err != nil || m > 0o777 {
		return 0, usagef("%s: mode=%q is not an octal file mode such as 0600", opt, s)
	}
	return os.FileMode(m), nil
}

// IsUsage reports whether err is a command-line error.
func IsUsage(err error) bool {
	var u *UsageError
	return errors.As(err, &u)
}

// CapabilitiesJSON is the --print-capabilities answer. Its single-line shape is
// matched by libvirt and swtpm_setup. Features vtpm does not implement (such
// as cmdarg-migration) are not claimed.
func CapabilitiesJSON() string {
	return `{ "type": "swtpm", "features": [ "tpm-2.0", "tpm-send-command-header", "flags-opt-startup", "cmdarg-seccomp", "cmdarg-key-fd", "cmdarg-pwd-fd", "cmdarg-print-states", "nvram-backend-dir", "nvram-backend-file", "rsa-keysize-1024", "rsa-keysize-2048", "rsa-keysize-3072" ], "version": "` + Version + `" }`
}

// StateInfo is one entry of --print-states.
type StateInfo struct {
	Name string
	Size int64
}

// StatesJSON formats --print-states like swtpm 0.7.1.
func StatesJSON(states []StateInfo) string {
	var b strings.Builder
	b.WriteString(`{ "type": "swtpm", "states": [`)
	for i, s := range states {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, ` {"name": "%s", "size": %d}`, s.Name, s.Size)
	}
	if len(states) > 0 {
		b.WriteString(" ")
	}
	b.WriteString(`] }`)
	return b.String()
}

// Usage is printed for --help and after a command-line error.
const Usage = `Usage: swtpm socket [options]

The following options are supported:
--tpm2                  : choose TPM 2.0 (the only version vtpm emulates)
-p|--port <port>        : server TCP port for TPM commands (or TPM_PORT)
-f|--fd <fd>            : use the connected file descriptor for TPM commands
-t|--terminate          : terminate when the client disconnects
-d|--daemon             : run in the background
--server type=tcp[,port=<port>][,bindaddr=<addr>][,fd=<fd>][,disconnect]
--server type=unixio[,path=<path>][,fd=<fd>][,mode=0...][,uid=..][,gid=..]
--ctrl type=unixio[,path=<path>][,fd=<fd>|clientfd=<fd>][,mode=0...][,uid=..][,gid=..]
--ctrl type=tcp[,port=<port>][,bindaddr=<addr>][,fd=<fd>]
--tpmstate dir=<dir>[,mode=0...][,format=sealed|swtpm]|backend-uri=dir://<dir>|file://<file>
                        : where the TPM state lives (or TPM_PATH); format= (or
                          VTPM_STATE_FORMAT) chooses a new directory's format:
                          sealed (the default) or swtpm's files
--key file=<path>|fd=<fd>|pwdfile=<path>|pwdfd=<fd>[,mode=aes-cbc|aes-256-cbc][,format=hex|binary][,remove][,kdf=pbkdf2|sha512]
                        : keep the state in swtpm's encrypted format with this key
--migration-key ...     : same syntax; encrypts state blobs sent to QEMU for migration
--data-key file=<path>|fd=<fd>[,format=hex|binary]
                        : 32-byte key for vtpm's sealed state (default: the host key)
--allow-rollback        : accept sealed state older than the last generation seen
--pid file=<path>|fd=<fd>
--log file=<path>|fd=<fd>[,level=n][,prefix=<p>][,truncate]
--locality reject-locality-4,allow-set-locality
--flags not-need-init,startup-clear|startup-state|startup-deactivated|startup-none
-r|--runas <user>       : drop privileges to this user after set-up
--seccomp action=none|kill|log
--isolation required|preferred
                        : sandbox the process (default: preferred); required refuses to start without every part
--print-capabilities    : print the supported features as JSON and exit
--print-states          : print the stored states as JSON and exit
-v|--version            : print the version and exit
-h|--help               : this help
`
