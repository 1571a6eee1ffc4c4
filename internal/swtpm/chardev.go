package swtpm

import (
	"io"

	"vtpm/internal/sandbox"
)

// ParseChardev parses the arguments that follow `swtpm chardev`: the TPM
// serves one data channel, a file descriptor it inherits (--fd) or a
// character device it opens (--chardev), where every read is one command
// and every write one response, and it ends when that channel hangs up. The
// control channel (--ctrl) and everything about state, keys, logs and
// privileges are those of `swtpm socket`. Linux's vTPM proxy (--vtpm-proxy)
// is not supported.
func ParseChardev(args []string, getenv func(string) string) (*Options, *Extensions, error) {
	var (
		a         shared
		fd        int
		vtpmProxy bool
	)
	c := &Options{DataFD: -1, PidFD: -1, Log: Log{FD: -1}, Chardev: true}
	x := &Extensions{Isolation: sandbox.Preferred}
	fs := newFlagSet("swtpm chardev", c, x, &a)
	fs.StringVarP(&c.Device, "chardev", "c", "", "")
	fs.IntVarP(&fd, "fd", "f", -1, "")
	fs.BoolVar(&vtpmProxy, "vtpm-proxy", false, "")
	if err := parseArgs(fs, args); err != nil {
		return nil, nil, err
	}
	if c.ShowHelp || c.ShowVersion || c.PrintCaps {
		return c, x, nil
	}
	if vtpmProxy {
		return nil, nil, usagef("--vtpm-proxy is not supported; give the TPM its channel with --fd or --chardev")
	}
	if err := c.parseStateOptions(x, a.tpmstate, getenv); err != nil {
		return nil, nil, err
	}
	if c.PrintStates {
		return c, x, nil
	}
	switch {
	case fs.Changed("fd") && c.Device != "":
		return nil, nil, usagef("--fd and --chardev exclude each other")
	case fs.Changed("fd") && fd < 0:
		return nil, nil, usagef("--fd %d is not a file descriptor", fd)
	case fs.Changed("fd") && fd <= 2:
		return nil, nil, usagef("--fd %d: file descriptors 0-2 cannot carry the data channel", fd)
	case !fs.Changed("fd") && c.Device == "":
		return nil, nil, usagef("missing character device or file descriptor: give --fd or --chardev")
	}
	// The TPM ends when its one data channel hangs up, as swtpm chardev.
	c.DataFD, c.Terminate = fd, true
	if err := c.parseIsolationCtrl(x, a.isolation, a.ctrl); err != nil {
		return nil, nil, err
	}
	if err := c.parseRest(&a); err != nil {
		return nil, nil, err
	}
	return c, x, nil
}

// ChardevUsage is printed for `swtpm chardev --help` and after a
// command-line error.
const ChardevUsage = `Usage: swtpm chardev [options]

The following options are supported:
--tpm2                  : choose TPM 2.0 (the only version vtpm emulates)
-f|--fd <fd>            : use the inherited file descriptor (a character device
                          or a socket) for TPM commands, one command per read
-c|--chardev <device>   : open the character device for TPM commands
-d|--daemon             : run in the background
--ctrl type=unixio[,path=<path>][,fd=<fd>|clientfd=<fd>][,mode=0...][,uid=..][,gid=..]
--ctrl type=tcp[,port=<port>][,bindaddr=<addr>][,fd=<fd>]
--tpmstate dir=<dir>[,mode=0...][,format=sealed|swtpm]|backend-uri=dir://<dir>|file://<file>
                        : where the TPM state lives (or TPM_PATH); format= (or
                          VTPM_STATE_FORMAT) chooses a new directory's format:
                          sealed (the default) or swtpm's files
--key ...               : keep the state in swtpm's encrypted format with this key
--migration-key ...     : encrypts state blobs sent for migration
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
-h|--help               : this help

The TPM ends when the data channel hangs up. --vtpm-proxy is not supported.
`

// NewChardevReader returns a reader that reads TPM commands as swtpm
// chardev does: one read is one command (a character device hands over whole
// messages; so does a socket whose peer writes each command at once),
// completed only up to the 10-byte header. A command may come wrapped in the
// TCG simulator's TPM_SEND_COMMAND prefix, as on the other channels.
func NewChardevReader(r io.Reader) *DataReader {
	return &DataReader{r: r, buf: make([]byte, maxDataRead), oneRead: true}
}
