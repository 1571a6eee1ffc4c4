package swtpm_test

import (
	"reflect"
	"strings"
	"testing"

	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm"
)

func TestParseChardev(t *testing.T) {
	chardev := func() *swtpm.Options {
		c := defaults()
		c.Chardev, c.Terminate, c.TPM2 = true, true, true
		return c
	}
	tests := []struct {
		name string
		args string
		want func(c *swtpm.Options)
		ext  swtpm.Extensions
	}{
		{
			// As swtpm's own tests run it: a pty or socketpair end on fd 100.
			name: "fd with a control socket",
			args: "--fd 100 --tpmstate dir=/d --pid file=/d/swtpm.pid --ctrl type=unixio,path=/d/sock,mode=0621,uid=65534,gid=65534 --tpm2",
			want: func(c *swtpm.Options) {
				c.DataFD, c.StateDir, c.PidFile = 100, "/d", "/d/swtpm.pid"
				c.Ctrl = endpoint("unixio")
				c.Ctrl.Path, c.Ctrl.Mode, c.Ctrl.UID, c.Ctrl.GID = "/d/sock", 0o621, 65534, 65534
			},
			ext: swtpm.Extensions{Isolation: sandbox.Preferred},
		},
		{
			name: "character device",
			args: "-c /dev/tpmx --tpmstate dir=/d,format=swtpm --tpm2 --flags not-need-init,startup-clear --locality allow-set-locality",
			want: func(c *swtpm.Options) {
				c.Device, c.StateDir = "/dev/tpmx", "/d"
				c.NotNeedInit, c.Startup, c.AllowSetLoc = true, "clear", true
			},
			ext: swtpm.Extensions{Isolation: sandbox.Preferred, StateFormat: "swtpm"},
		},
		{
			name: "vtpm's options",
			args: "-f 7 --tpmstate dir=/d --tpm2 --data-key file=/k --isolation required --runas tss --seccomp action=log --log fd=9,level=20",
			want: func(c *swtpm.Options) {
				c.DataFD, c.StateDir, c.RunAs, c.Seccomp = 7, "/d", "tss", "log"
				c.Log = swtpm.Log{FD: 9, Level: 20}
			},
			ext: swtpm.Extensions{DataKey: "file=/k", Isolation: sandbox.Required},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ext, err := swtpm.ParseChardev(strings.Fields(tc.args), env())
			if err != nil {
				t.Fatalf("ParseChardev: %v", err)
			}
			want := chardev()
			tc.want(want)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("ParseChardev(%s)\n got %s\nwant %s", tc.args, describe(got), describe(want))
			}
			if *ext != tc.ext {
				t.Errorf("ParseChardev(%s) extensions\n got %+v\nwant %+v", tc.args, *ext, tc.ext)
			}
		})
	}
}

func TestParseChardevErrors(t *testing.T) {
	tests := []struct {
		name string
		args string
		want string
	}{
		{"no channel", "--tpmstate dir=/d --tpm2", "missing character device or file descriptor"},
		{"fd 0", "--fd 0 --tpmstate dir=/d", "file descriptors 0-2"},
		{"fd 2", "-f 2 --tpmstate dir=/d", "file descriptors 0-2"},
		{"negative fd", "--fd=-1 --tpmstate dir=/d", "not a file descriptor"},
		{"fd and device", "--fd 5 -c /dev/x --tpmstate dir=/d", "exclude each other"},
		{"vtpm proxy", "--vtpm-proxy --tpmstate dir=/d", "--vtpm-proxy is not supported"},
		{"socket options", "--fd 5 --tpmstate dir=/d --server type=tcp,port=1", "unrecognized option"},
		{"terminate is socket's", "--fd 5 --tpmstate dir=/d -t", "'t'"},
		{"no state", "--fd 5 --tpm2", "no TPM state location"},
		{"stray argument", "--fd 5 --tpmstate dir=/d stray", "Unknown parameter 'stray'"},
		{"bad ctrl", "--fd 5 --tpmstate dir=/d --ctrl type=unixio", "--ctrl: type=unixio needs path="},
		{"bad seccomp", "--fd 5 --tpmstate dir=/d --seccomp action=trap", `action="trap"`},
		{"bad isolation", "--fd 5 --tpmstate dir=/d --isolation strict", "--isolation strict"},
		{"print-states without state", "--print-states", "--print-states needs --tpmstate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, _, err := swtpm.ParseChardev(strings.Fields(tc.args), env())
			if err == nil {
				t.Fatalf("ParseChardev(%s) succeeded:\n%s", tc.args, describe(c))
			}
			if !strings.Contains(err.Error(), tc.want) || !swtpm.IsUsage(err) {
				t.Errorf("ParseChardev(%s): %v; want a usage error containing %q", tc.args, err, tc.want)
			}
		})
	}
}
