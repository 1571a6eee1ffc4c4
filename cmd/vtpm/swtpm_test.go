package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestSwtpmInterfaces: clients learn which interfaces swtpm has from
// `swtpm IFACE --help` and swtpm's "Unsupported TPM interface" message
// (swtpm's own tests do, before running chardev tests).
func TestSwtpmInterfaces(t *testing.T) {
	tests := []struct {
		args      []string
		code      int
		stdout    string // prefix
		stderr    string // substring
		supported bool
	}{
		{[]string{"socket", "--help"}, 0, "Usage: swtpm socket", "", true},
		{[]string{"chardev", "--help"}, 0, "Usage: swtpm chardev", "", true},
		{[]string{"cuse", "--help"}, 1, "", "Unsupported TPM interface type 'cuse'.", false},
		{[]string{"chardev", "--vtpm-proxy", "--tpm2", "--tpmstate", "dir=/nonexistent"}, 1, "", "--vtpm-proxy is not supported", true},
		{nil, 1, "", "Missing TPM interface type.", false},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		code := runSwtpm(tc.args, &out, &errb)
		if code != tc.code || !strings.HasPrefix(out.String(), tc.stdout) || !strings.Contains(errb.String(), tc.stderr) {
			t.Errorf("swtpm %v: exit %d, stdout %q, stderr %q; want exit %d, stdout %q…, stderr containing %q",
				tc.args, code, out.String(), errb.String(), tc.code, tc.stdout, tc.stderr)
		}
		if got := !strings.Contains(out.String()+errb.String(), "Unsupported TPM interface"); len(tc.args) > 0 && got != tc.supported {
			t.Errorf("swtpm %v: looks supported %v, want %v", tc.args, got, tc.supported)
		}
	}
}
