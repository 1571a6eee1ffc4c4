package swtpm_test

import (
	"strings"
	"testing"

	"vtpm/internal/swtpm"
)

func TestParseStateFormat(t *testing.T) {
	const rest = " --ctrl type=unixio,path=/s"
	tests := []struct {
		name   string
		args   string
		getenv func(string) string
		want   string // StateFormat, or the error's substring with err
		err    bool
	}{
		{"none", "--tpmstate dir=/d", env(), "", false},
		{"swtpm", "--tpmstate dir=/d,format=swtpm", env(), "swtpm", false},
		{"sealed", "--tpmstate dir=/d,mode=0600,format=sealed", env(), "sealed", false},
		{"with backend-uri", "--tpmstate backend-uri=file:///dev/loop0,format=swtpm", env(), "swtpm", false},
		{"from the environment", "--tpmstate dir=/d", env(swtpm.StateFormatEnv, "swtpm"), "swtpm", false},
		{"from the environment with TPM_PATH", "", env("TPM_PATH", "/d", swtpm.StateFormatEnv, "sealed"), "sealed", false},
		{"the option wins", "--tpmstate dir=/d,format=sealed", env(swtpm.StateFormatEnv, "swtpm"), "sealed", false},
		{"bad option", "--tpmstate dir=/d,format=linear", env(), `--tpmstate format="linear": want sealed or swtpm`, true},
		{"bad environment", "--tpmstate dir=/d", env(swtpm.StateFormatEnv, "SWTPM"), `VTPM_STATE_FORMAT="SWTPM": want sealed or swtpm`, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, parse := range []struct {
				iface string
				fn    func([]string, func(string) string) (*swtpm.Options, *swtpm.Extensions, error)
				extra string
			}{{"socket", swtpm.Parse, rest}, {"chardev", swtpm.ParseChardev, rest + " --fd 5"}} {
				_, x, err := parse.fn(strings.Fields(tc.args+parse.extra), tc.getenv)
				switch {
				case tc.err && err == nil:
					t.Errorf("%s: Parse(%s) succeeded with format %q", parse.iface, tc.args, x.StateFormat)
				case tc.err && (!strings.Contains(err.Error(), tc.want) || !swtpm.IsUsage(err)):
					t.Errorf("%s: Parse(%s): %v; want a usage error containing %q", parse.iface, tc.args, err, tc.want)
				case !tc.err && err != nil:
					t.Errorf("%s: Parse(%s): %v", parse.iface, tc.args, err)
				case !tc.err && x.StateFormat != tc.want:
					t.Errorf("%s: Parse(%s): format %q, want %q", parse.iface, tc.args, x.StateFormat, tc.want)
				}
			}
		})
	}
}
