package vm

import (
	"slices"
	"testing"

	"vtpm/internal/sandbox"
)

// TestIsolationPolicy: a VM's vTPM must be isolated unless its policy says
// preferred, and the instance is told so.
func TestIsolationPolicy(t *testing.T) {
	for _, tc := range []struct {
		set  string
		want sandbox.Isolation
	}{
		{IsolationDefault, sandbox.Required},
		{IsolationRequired, sandbox.Required},
		{IsolationPreferred, sandbox.Preferred},
	} {
		v := &VM{Dir: "/vms/x", Config: &Config{Name: "x", Isolation: tc.set}}
		if got := v.Config.IsolationPolicy(); got != tc.want {
			t.Errorf("policy %q: effective %q, want %q", tc.set, got, tc.want)
		}
		args := (&Registry{}).tpmArgs(v, runPaths{TPMSock: "/run/x/tpm.sock", TPMPid: "/run/x/tpm.pid"}, "")
		i := slices.Index(args, "--isolation")
		if i < 0 || i+1 >= len(args) || args[i+1] != string(tc.want) {
			t.Errorf("policy %q: instance arguments %q, want --isolation %s", tc.set, args, tc.want)
		}
	}
}
