package hostcheck

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestParseQEMUVersion(t *testing.T) {
	tests := []struct {
		out          string
		major, minor int
		ok           bool
	}{
		{"QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n", 7, 2, true},
		{"QEMU emulator version 10.0.0\n", 10, 0, true},
		{"garbage", 0, 0, false},
	}
	for _, tt := range tests {
		major, minor, ok := parseQEMUVersion([]byte(tt.out))
		if major != tt.major || minor != tt.minor || ok != tt.ok {
			t.Errorf("parseQEMUVersion(%q) = %d, %d, %v; want %d, %d, %v", tt.out, major, minor, ok, tt.major, tt.minor, tt.ok)
		}
	}
}

func TestQEMUAgreesWithDoctor(t *testing.T) {
	byName := map[string]Check{}
	for _, c := range QEMUChecks(t.Context()) {
		byName[c.Name] = c
	}
	if (QEMUUsable() == nil) != (byName["qemu"].Status == OK) {
		t.Errorf("QEMUUsable = %v, doctor says %+v", QEMUUsable(), byName["qemu"])
	}
	if tpm, ok := byName["qemu tpm-emulator"]; ok && (TPMEmulatorUsable() == nil) != (tpm.Status == OK) {
		t.Errorf("TPMEmulatorUsable = %v, doctor says %+v", TPMEmulatorUsable(), tpm)
	}
}

func TestAccel(t *testing.T) {
	tests := []struct {
		requested, env, want string
		wantErr              bool
	}{
		{"kvm", "tcg", "kvm", false},
		{"tcg", "kvm", "tcg", false},
		{"", "tcg", "tcg", false},
		{"", "kvm", "kvm", false},
		{"hvf", "", "", true},
		{"", "xen", "", true},
	}
	for _, tt := range tests {
		t.Setenv("VTPM_ACCEL", tt.env)
		got, err := Accel(tt.requested)
		if got != tt.want || (err != nil) != tt.wantErr {
			t.Errorf("Accel(%q) with VTPM_ACCEL=%q = %q, %v; want %q (error %v)", tt.requested, tt.env, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestFirmware(t *testing.T) {
	old := FirmwareDir
	t.Cleanup(func() { FirmwareDir = old })
	FirmwareDir = t.TempDir()
	code, vars := Firmware(false)
	scode, svars := Firmware(true)
	for _, tt := range []struct{ got, want string }{
		{code, OVMFCode}, {vars, OVMFVars}, {scode, OVMFCodeSecure}, {svars, OVMFVarsMS},
	} {
		if tt.got != filepath.Join(FirmwareDir, tt.want) {
			t.Errorf("firmware file %s, want %s in %s", tt.got, tt.want, FirmwareDir)
		}
	}
	if c := FirmwareCheck(); c.Status != Missing || !strings.Contains(c.Detail, scode) || len(c.Fix) == 0 {
		t.Errorf("no firmware: %+v", c)
	}
	for _, f := range FirmwareFiles() {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if absent := MissingFirmware(FirmwareFiles()...); len(absent) != 0 {
		t.Errorf("MissingFirmware = %v with every file there", absent)
	}
	if c := FirmwareCheck(); c.Status != OK {
		t.Errorf("all firmware: %+v", c)
	}
}

func TestSandboxJudgement(t *testing.T) {
	confined := map[string]string{
		"write inside the state directory":  "ok",
		"write outside the state directory": "permission denied",
		"write the generation record":       "ok",
		"write elsewhere in the data root":  "permission denied",
		"socket inet":                       "operation not permitted",
		"socket inet6":                      "operation not permitted",
		"socket netlink":                    "operation not permitted",
		"connect 127.0.0.1:1":               "operation not permitted",
	}
	open := maps(confined, "socket inet", "ok")
	leaky := maps(confined, "write outside the state directory", "ok")
	leakyRoot := maps(confined, "write elsewhere in the data root", "ok")
	tests := []struct {
		name string
		res  ProbeResult
		want map[string]Status
	}{
		{"confined", ProbeResult{Landlock: 3, Seccomp: "2", NoNewPrivs: "1", Tries: confined},
			map[string]Status{"seccomp": OK, "landlock": OK, "no_new_privs": OK}},
		{"network open", ProbeResult{Landlock: 3, Seccomp: "2", NoNewPrivs: "1", Tries: open},
			map[string]Status{"seccomp": Missing, "landlock": OK, "no_new_privs": OK}},
		{"landlock without effect", ProbeResult{Landlock: 3, Seccomp: "2", NoNewPrivs: "1", Tries: leaky},
			map[string]Status{"seccomp": OK, "landlock": Missing, "no_new_privs": OK}},
		{"data root writable", ProbeResult{Landlock: 3, Seccomp: "2", NoNewPrivs: "1", Tries: leakyRoot},
			map[string]Status{"seccomp": OK, "landlock": Missing, "no_new_privs": OK}},
		{"no filter, dumpable", ProbeResult{Landlock: 3, Seccomp: "0", NoNewPrivs: "0", Dumpable: 1, Tries: confined},
			map[string]Status{"seccomp": Missing, "landlock": OK, "no_new_privs": Missing}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, c := range sandboxChecks(&tt.res) {
				if c.Status != tt.want[c.Name] {
					t.Errorf("%s: %s, want %s (%s)", c.Name, c.Status, tt.want[c.Name], c.Detail)
				}
				if c.Status != OK && len(c.Fix) == 0 {
					t.Errorf("%s is %s without a fix", c.Name, c.Status)
				}
			}
		})
	}
}

func maps(m map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for mk, mv := range m {
		if mk != k {
			out[mk] = mv
		}
	}
	return out
}

func TestDataRootCheck(t *testing.T) {
	tests := []struct {
		name    string
		mode    os.FileMode // 0: not created
		want    Status
		wantFix string
	}{
		{"absent", 0, Warning, ""},
		{"private", 0o700, OK, ""},
		{"readable by others", 0o755, Missing, "chmod 700 "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "vtpm")
			if tt.mode != 0 {
				if err := os.Mkdir(root, tt.mode); err != nil {
					t.Fatal(err)
				}
				os.Chmod(root, tt.mode)
			}
			c := DataRootCheck(root)
			fix := ""
			for _, r := range c.Fix {
				fix += r.Note
			}
			if c.Status != tt.want || !strings.Contains(c.Detail, root) || !strings.Contains(fix, tt.wantFix) {
				t.Errorf("%+v, want %s with fix %q", c, tt.want, tt.wantFix)
			}
		})
	}
}

func TestProbeArgs(t *testing.T) {
	got := ProbeArgs(ProbeOptions{StateDir: "/s", DataRoot: "/r", Connect: "127.0.0.1:9", TryExec: true})
	want := []string{"doctor", "--probe-sandbox", "--state", "/s", "--data-root", "/r", "--connect", "127.0.0.1:9", "--try-exec"}
	if !slices.Equal(got, want) {
		t.Errorf("ProbeArgs = %q, want %q", got, want)
	}
}

// TestKVMCheckAgreesWithTheProbe: doctor and a VM's start never disagree.
func TestKVMCheckAgreesWithTheProbe(t *testing.T) {
	c := KVMCheck()
	usable := KVMUsable() == nil
	if usable != (c.Status == OK) && !strings.Contains(c.Detail, "not installed") {
		t.Errorf("KVMCheck %+v, but KVMUsable says %v", c, usable)
	}
	t.Setenv("VTPM_ACCEL", "")
	accel, err := Accel("")
	if err != nil || (accel == "kvm") != usable {
		t.Errorf("Accel(\"\") = %q, %v with KVM usable %v", accel, err, usable)
	}
}
