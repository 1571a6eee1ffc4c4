package swtpm_test

import (
	"fmt"
	"reflect"
	"strings"
	"testing"

	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm"
)

// env is a getenv for Parse.
func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

// defaults is what Parse yields before any option sets something.
func defaults() *swtpm.Options {
	return &swtpm.Options{DataFD: -1, PidFD: -1, Log: swtpm.Log{FD: -1}, StateMode: 0o640}
}

// endpoint is an --ctrl/--server value with parseEndpoint's defaults.
func endpoint(typ string) *swtpm.Endpoint {
	return &swtpm.Endpoint{Type: typ, Port: -1, FD: -1, ClientFD: -1, UID: -1, GID: -1, Mode: 0o770, BindAddr: "127.0.0.1"}
}

// describe prints a Config with its endpoints dereferenced.
func describe(c *swtpm.Options) string {
	if c == nil {
		return "<nil>"
	}
	s := fmt.Sprintf("%+v", *c)
	for _, e := range []struct {
		name string
		ep   *swtpm.Endpoint
	}{{"Ctrl", c.Ctrl}, {"Server", c.Server}} {
		if e.ep != nil {
			s += fmt.Sprintf("\n  %s: %+v", e.name, *e.ep)
		}
	}
	return s
}

// normalise clears what does not matter for comparison: the socket mode of a
// TCP endpoint.
func normalise(c *swtpm.Options) {
	for _, e := range []*swtpm.Endpoint{c.Ctrl, c.Server} {
		if e != nil && e.Type == "tcp" {
			e.Mode = 0
		}
	}
}

func TestParse(t *testing.T) {
	const (
		sock  = "/run/libvirt/qemu/swtpm/1-win11-swtpm.sock"
		state = "/var/lib/libvirt/swtpm/6c3c7a2e-5b1f-4a8e-9d0c-1f2e3d4c5b6a/tpm2"
		log   = "/var/log/swtpm/libvirt/qemu/win11-swtpm.log"
	)
	tests := []struct {
		name   string
		args   string // split on spaces
		getenv func(string) string
		want   func(c *swtpm.Options)
		ext    *swtpm.Extensions // nil: the defaults
	}{
		{
			name: "libvirt 9.x emulator",
			args: "--ctrl type=unixio,path=" + sock + ",mode=0600 --tpmstate dir=" + state + ",mode=0600 --log file=" + log + " --terminate --tpm2",
			want: func(c *swtpm.Options) {
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path, c.Ctrl.Mode = sock, 0o600
				c.StateDir, c.StateMode, c.StateModeSet = state, 0o600, true
				c.Log = swtpm.Log{File: log, FD: -1, Level: 1}
				c.Terminate, c.TPM2 = true, true
			},
		},
		{
			name: "libvirt 9.x emulator with encrypted state",
			args: "--ctrl type=unixio,path=" + sock + ",mode=0600 --tpmstate dir=" + state + ",mode=0600 --log file=" + log + " --terminate --tpm2 --key pwdfd=20,mode=aes-256-cbc --migration-key pwdfd=21,mode=aes-256-cbc",
			want: func(c *swtpm.Options) {
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path, c.Ctrl.Mode = sock, 0o600
				c.StateDir, c.StateMode, c.StateModeSet = state, 0o600, true
				c.Log = swtpm.Log{File: log, FD: -1, Level: 1}
				c.Terminate, c.TPM2 = true, true
				c.Key, c.MigrationKey = "pwdfd=20,mode=aes-256-cbc", "pwdfd=21,mode=aes-256-cbc"
			},
		},
		{
			name: "swtpm_setup 0.7.1 starting the TPM",
			args: "--flags not-need-init,startup-clear --tpmstate backend-uri=dir:///var/lib/swtpm/st --pid file=/tmp/swtpm_setup.1a2b3c/.swtpm_setup.pidfile.XyZ123 --tpm2 --log file=/var/log/swtpm_setup.log --server type=tcp,fd=5 --ctrl type=unixio,clientfd=6",
			want: func(c *swtpm.Options) {
				c.NotNeedInit, c.Startup = true, "clear"
				c.StateDir = "/var/lib/swtpm/st"
				c.PidFile = "/tmp/swtpm_setup.1a2b3c/.swtpm_setup.pidfile.XyZ123"
				c.TPM2 = true
				c.Log = swtpm.Log{File: "/var/log/swtpm_setup.log", FD: -1, Level: 1}
				c.Server = endpoint("tcp")
				c.Server.FD = 5
				c.Ctrl = endpoint("unixio")
				c.Ctrl.ClientFD = 6
			},
		},
		{
			name: "swtpm_setup 0.7.1 with a key file",
			args: "--flags not-need-init,startup-clear --tpmstate backend-uri=dir:///st --pid file=/tmp/p --tpm2 --key file=/etc/key,mode=aes-256-cbc --server type=tcp,fd=5 --ctrl type=unixio,clientfd=6",
			want: func(c *swtpm.Options) {
				c.NotNeedInit, c.Startup = true, "clear"
				c.StateDir, c.PidFile, c.TPM2 = "/st", "/tmp/p", true
				c.Key = "file=/etc/key,mode=aes-256-cbc"
				c.Server = endpoint("tcp")
				c.Server.FD = 5
				c.Ctrl = endpoint("unixio")
				c.Ctrl.ClientFD = 6
			},
		},
		{
			name: "swtpm_setup 0.7.1 checking for state",
			args: "--print-states --tpmstate backend-uri=dir:///var/lib/swtpm/st --tpm2",
			want: func(c *swtpm.Options) {
				c.PrintStates, c.StateDir, c.TPM2 = true, "/var/lib/swtpm/st", true
			},
		},
		{
			name: "swtpm_setup 0.7.1 probing capabilities",
			args: "--print-capabilities --log file=/var/log/swtpm_setup.log",
			want: func(c *swtpm.Options) {
				*c = swtpm.Options{DataFD: -1, PidFD: -1, Log: swtpm.Log{FD: -1}, PrintCaps: true}
			},
		},
		{
			name: "swtpm_setup 0.7.1 probing TPM 2 capabilities",
			args: "--tpm2 --print-capabilities",
			want: func(c *swtpm.Options) {
				*c = swtpm.Options{DataFD: -1, PidFD: -1, Log: swtpm.Log{FD: -1}, PrintCaps: true, TPM2: true}
			},
		},
		{
			name: "QEMU documentation",
			args: "--tpmstate dir=/tmp/mytpm1 --ctrl type=unixio,path=/tmp/mytpm1/swtpm-sock --tpm2 --log level=20",
			want: func(c *swtpm.Options) {
				c.StateDir, c.TPM2 = "/tmp/mytpm1", true
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path = "/tmp/mytpm1/swtpm-sock"
				c.Log.Level = 20
			},
		},
		{
			name: "tpm2-tss integration tests",
			args: "--tpm2 -p 2321 --ctrl type=tcp,port=2322 --log fd=1,level=5 --flags not-need-init --tpmstate dir=/tmp/tss --locality allow-set-locality",
			want: func(c *swtpm.Options) {
				c.TPM2, c.NotNeedInit, c.AllowSetLoc = true, true, true
				// -p is --server type=tcp,disconnect: bound to 127.0.0.1 like every TCP socket.
				c.Server = endpoint("tcp")
				c.Server.Port, c.Server.Disconnect = 2321, true
				c.Ctrl = endpoint("tcp")
				c.Ctrl.Port = 2322
				c.Log = swtpm.Log{FD: 1, Level: 5}
				c.StateDir = "/tmp/tss"
			},
		},
		{
			name: "vtpm over TCP with sealed state options",
			args: "--tpm2 --tpmstate dir=/d --ctrl type=tcp,port=2322,bindaddr=::1 --server type=tcp,port=2321,disconnect --flags not-need-init,startup-state --data-key file=/k --allow-rollback --seccomp action=log --locality reject-locality-4 --pid fd=9 --runas tss",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Ctrl = endpoint("tcp")
				c.Ctrl.Port, c.Ctrl.BindAddr = 2322, "::1"
				c.Server = endpoint("tcp")
				c.Server.Port, c.Server.Disconnect = 2321, true
				c.NotNeedInit, c.Startup = true, "state"
				c.Seccomp, c.RejectLoc4, c.PidFD, c.RunAs = "log", true, 9, "tss"
			},
			ext: &swtpm.Extensions{DataKey: "file=/k", AllowRollback: true, Isolation: sandbox.Preferred},
		},
		{
			name: "vtpm VM start: isolation required",
			args: "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s --isolation required",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path = "/s"
			},
			ext: &swtpm.Extensions{Isolation: sandbox.Required},
		},
		{
			name: "an empty --isolation keeps the drop-in's default",
			args: "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s --isolation=",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path = "/s"
			},
			ext: &swtpm.Extensions{Isolation: sandbox.Preferred},
		},
		{
			name:   "TPM_PATH stands in for --tpmstate",
			args:   "--tpm2 --server type=tcp,port=2321",
			getenv: env("TPM_PATH", "/tmp/tpm-path"),
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/tmp/tpm-path"
				c.Server = endpoint("tcp")
				c.Server.Port = 2321
			},
		},
		{
			name:   "--tpmstate wins over TPM_PATH",
			args:   "--tpm2 --tpmstate dir=/explicit --server type=tcp,port=2321",
			getenv: env("TPM_PATH", "/tmp/tpm-path"),
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/explicit"
				c.Server = endpoint("tcp")
				c.Server.Port = 2321
			},
		},
		{
			name:   "TPM_PORT stands in for port=",
			args:   "--tpm2 --tpmstate dir=/d --server type=tcp",
			getenv: env("TPM_PORT", "2400"),
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Server = endpoint("tcp")
				c.Server.Port = 2400
			},
		},
		{
			name:   "port= wins over TPM_PORT",
			args:   "--tpm2 --tpmstate dir=/d --server type=tcp,port=2500",
			getenv: env("TPM_PORT", "2400"),
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Server = endpoint("tcp")
				c.Server.Port = 2500
			},
		},
		{
			name: "--server type defaults to tcp, as in swtpm",
			args: "--tpm2 --tpmstate dir=/d --server port=2321",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Server = endpoint("tcp")
				c.Server.Port = 2321
			},
		},
		{
			name: "connected data fd",
			args: "--tpm2 --tpmstate dir=/d --fd 5",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.DataFD, c.Terminate = 5, true
			},
		},
		{
			name: "unix data socket with owner",
			args: "--tpm2 --tpmstate dir=/d,mode=0640 --server type=unixio,path=/run/tpm.sock,mode=0660,uid=59,gid=59",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir, c.StateModeSet = true, "/d", true
				c.Server = endpoint("unixio")
				c.Server.Path, c.Server.Mode, c.Server.UID, c.Server.GID = "/run/tpm.sock", 0o660, 59, 59
			},
		},
		{
			name: "ctrl channel alone (data fd comes by CMD_SET_DATAFD)",
			args: "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path = "/s"
			},
		},
		{
			name: "startup-none does not imply not-need-init, as in swtpm",
			args: "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s --flags startup-none",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path = "/s"
				c.Startup = "none"
			},
		},
		{
			name: "startup-deactivated implies not-need-init",
			args: "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s --flags startup-deactivated",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path = "/s"
				c.Startup, c.NotNeedInit = "deactivated", true
			},
		},
		{
			name: "log file with prefix, truncated",
			args: "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s --log file=/l,level=3,prefix=tpm:,truncate",
			want: func(c *swtpm.Options) {
				c.TPM2, c.StateDir = true, "/d"
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path = "/s"
				c.Log = swtpm.Log{File: "/l", FD: -1, Level: 3, Prefix: "tpm:", Truncate: true}
			},
		},
		{
			name: "help needs nothing else",
			args: "--help",
			want: func(c *swtpm.Options) {
				*c = swtpm.Options{DataFD: -1, PidFD: -1, Log: swtpm.Log{FD: -1}, ShowHelp: true}
			},
		},
		{
			name: "version needs nothing else",
			args: "-v",
			want: func(c *swtpm.Options) {
				*c = swtpm.Options{DataFD: -1, PidFD: -1, Log: swtpm.Log{FD: -1}, ShowVersion: true}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			getenv := tc.getenv
			if getenv == nil {
				getenv = env()
			}
			got, gotExt, err := swtpm.Parse(strings.Fields(tc.args), getenv)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			wantExt := &swtpm.Extensions{Isolation: sandbox.Preferred} // the swtpm drop-in's isolation
			if tc.ext != nil {
				wantExt = tc.ext
			}
			if *gotExt != *wantExt {
				t.Errorf("Parse(%s) extensions\n got %+v\nwant %+v", tc.args, *gotExt, *wantExt)
			}
			want := defaults()
			tc.want(want)
			normalise(got)
			normalise(want)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Parse(%s)\n got %s\nwant %s", tc.args, describe(got), describe(want))
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	const ok = "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s"
	environ := map[string]func(string) string{
		"bad TPM_PORT":   env("TPM_PORT", "99999"),
		"empty TPM_PATH": env("TPM_PATH", ""),
	}
	tests := []struct {
		name string
		args string
		want string // substring of the error
	}{
		{"unknown option", ok + " --bogus", "unrecognized option"},
		{"unknown short option", ok + " -Z", "'Z'"},
		{"stray argument", ok + " stray", "Unknown parameter 'stray'"},
		{"missing option value", ok + " --tpmstate", "needs an argument"},
		{"non-numeric port", "--tpm2 --tpmstate dir=/d -p http", "invalid argument"},
		{"port out of range", "--tpm2 --tpmstate dir=/d -p 65536", "65536"},
		{"negative port", "--tpm2 --tpmstate dir=/d --port=-5", "-5"},
		{"unknown tpmstate sub-option", "--tpm2 --tpmstate dir=/d,size=1", `--tpmstate: unknown sub-option "size"`},
		{"duplicate sub-option", "--tpm2 --tpmstate dir=/d,dir=/e --ctrl type=unixio,path=/s", `sub-option "dir" given more than once`},
		{"sub-option without a name", "--tpm2 --tpmstate =x --ctrl type=unixio,path=/s", "has no name"},
		{"unknown ctrl sub-option", "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s,disconnect", `--ctrl: unknown sub-option "disconnect"`},
		{"unknown server sub-option", "--tpm2 --tpmstate dir=/d --server type=tcp,port=1,clientfd=3", `--server: unknown sub-option "clientfd"`},
		{"ctrl without type", "--tpm2 --tpmstate dir=/d --ctrl path=/s", "--ctrl: missing type="},
		{"bad ctrl type", "--tpm2 --tpmstate dir=/d --ctrl type=udp,port=1", `--ctrl: type="udp"`},
		{"unixio ctrl without path", "--tpm2 --tpmstate dir=/d --ctrl type=unixio", "--ctrl: type=unixio needs path="},
		{"tcp ctrl without port", "--tpm2 --tpmstate dir=/d --ctrl type=tcp", "--ctrl: type=tcp needs port= or fd="},
		{"clientfd on tcp", "--tpm2 --tpmstate dir=/d --ctrl type=tcp,clientfd=4", "clientfd= works only with type=unixio"},
		{"empty bind address", "--tpm2 --tpmstate dir=/d --ctrl type=tcp,port=2322,bindaddr=", "bindaddr"},
		{"bad ctrl port", "--tpm2 --tpmstate dir=/d --ctrl type=tcp,port=65536", `"65536" is not a port number`},
		{"negative fd", "--tpm2 --tpmstate dir=/d --ctrl type=unixio,fd=-1", `fd="-1" is not a non-negative number`},
		{"bad uid", "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s,uid=root", `uid="root"`},
		{"bad socket mode", "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s,mode=0999", `mode="0999" is not an octal file mode`},
		{"socket mode beyond permissions", "--tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s,mode=01777", `mode="01777"`},
		{"bad state mode", "--tpm2 --tpmstate dir=/d,mode=rw --ctrl type=unixio,path=/s", `--tpmstate: mode="rw"`},
		{"bad disconnect value", "--tpm2 --tpmstate dir=/d --server type=tcp,port=1,disconnect=yes", `disconnect="yes"`},
		{"tcp server without port", "--tpm2 --tpmstate dir=/d --server type=tcp", "needs port=, fd= or the TPM_PORT"},
		{"bad TPM_PORT", "--tpm2 --tpmstate dir=/d --server type=tcp", `TPM_PORT: "99999" is not a port number`},
		{"unixio server without path", "--tpm2 --tpmstate dir=/d --server type=unixio", "--server: type=unixio needs path="},
		{"port and server", "--tpm2 --tpmstate dir=/d -p 1 --server type=tcp,port=2", "cannot be combined"},
		{"fd 0", "--tpm2 --tpmstate dir=/d --fd 0", "file descriptors 0-2"},
		{"fd 1", "--tpm2 --tpmstate dir=/d -f 1", "file descriptors 0-2"},
		{"fd 2", "--tpm2 --tpmstate dir=/d --fd=2", "file descriptors 0-2"},
		{"no data channel", "--tpm2 --tpmstate dir=/d", "no data channel"},
		{"missing state", "--tpm2 --ctrl type=unixio,path=/s", "no TPM state location"},
		{"empty TPM_PATH", "--tpm2 --ctrl type=unixio,path=/s", "no TPM state location"},
		{"tpmstate without dir", "--tpm2 --tpmstate mode=0600 --ctrl type=unixio,path=/s", "--tpmstate: missing dir= or backend-uri="},
		{"tpmstate with empty dir", "--tpm2 --tpmstate dir= --ctrl type=unixio,path=/s", "--tpmstate: missing dir="},
		{"tpmstate dir and backend-uri", "--tpm2 --tpmstate dir=/d,backend-uri=dir:///e --ctrl type=unixio,path=/s", "cannot be combined"},
		{"unknown backend", "--tpm2 --tpmstate backend-uri=nvme:///d --ctrl type=unixio,path=/s", `backend-uri="nvme:///d"`},
		{"print-states without state", "--tpm2 --print-states", "--print-states needs --tpmstate"},
		{"pid without file or fd", ok + " --pid mode=1", `--pid: unknown sub-option "mode"`},
		{"empty pid", ok + " --pid ,", "--pid: missing file= or fd="},
		{"bad pid fd", ok + " --pid fd=x", `--pid: fd="x"`},
		{"bad log level", ok + " --log file=/l,level=high", `--log: level="high"`},
		{"bad log fd", ok + " --log fd=-3", `--log: fd="-3"`},
		{"bad log truncate", ok + " --log file=/l,truncate=maybe", `truncate="maybe"`},
		{"unknown locality flag", ok + " --locality allow-locality-5", `--locality: unknown sub-option "allow-locality-5"`},
		{"unknown flag", ok + " --flags need-init", `--flags: unknown sub-option "need-init"`},
		{"two startup types", ok + " --flags startup-clear,startup-state", "startup-clear and startup-state exclude each other"},
		{"bad seccomp action", ok + " --seccomp action=trap", `--seccomp: action="trap"`},
		{"unknown seccomp sub-option", ok + " --seccomp mode=kill", `--seccomp: unknown sub-option "mode"`},
		{"unknown isolation", ok + " --isolation sometimes", "--isolation sometimes: want required, preferred or none"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			getenv := environ[tc.name]
			if getenv == nil {
				getenv = env()
			}
			c, _, err := swtpm.Parse(strings.Fields(tc.args), getenv)
			if err == nil {
				t.Fatalf("Parse(%s) succeeded:\n%s\nwant an error containing %q", tc.args, describe(c), tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse(%s) error %q does not contain %q", tc.args, err, tc.want)
			}
			if !swtpm.IsUsage(err) {
				t.Errorf("Parse(%s) error %q is not a usage error", tc.args, err)
			}
		})
	}
}

// TestParseErrorIsStable checks that a command line with several mistakes
// always gets the same message, so that logs and tests can rely on it.
func TestParseErrorIsStable(t *testing.T) {
	args := strings.Fields("--tpm2 --tpmstate dir=/d --server type=unixio,path=/s,uid=a,gid=b,fd=c")
	_, _, first := swtpm.Parse(args, env())
	if first == nil {
		t.Fatal("Parse accepted non-numeric uid, gid and fd")
	}
	for range 50 {
		if _, _, err := swtpm.Parse(args, env()); err == nil || err.Error() != first.Error() {
			t.Fatalf("Parse error changes between runs: %q, then %v", first, err)
		}
	}
}
