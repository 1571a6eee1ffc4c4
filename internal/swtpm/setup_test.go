package swtpm_test

import (
	"reflect"
	"testing"

	"vtpm/internal/swtpm"
)

func TestParseSetup(t *testing.T) {
	def := func(f func(o *swtpm.SetupOptions)) *swtpm.SetupOptions {
		o := &swtpm.SetupOptions{Cipher: "aes-128-cbc", RSAKeySize: "2048", ECCCurve: "p256"}
		f(o)
		return o
	}
	tests := []struct {
		name string
		args []string
		want *swtpm.SetupOptions
	}{
		{"libvirt", []string{"--tpm2", "--tpm-state", "/s", "--vmid", "vm1", "--logfile", "/l", "--createek",
			"--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--not-overwrite"},
			def(func(o *swtpm.SetupOptions) {
				o.TPM2, o.StateDir, o.VMID, o.Logfile, o.CreateEK, o.EKCert, o.PlatformCert, o.LockNV, o.NotOverwrite =
					true, "/s", "vm1", "/l", true, true, true, true, true
			})},
		{"attached values and aliases", []string{"--tpmstate=dir:///s", "--pcr-banks=sha1,sha256", "--cipher=aes-256-cbc", "--ecc-curve", "p384"},
			def(func(o *swtpm.SetupOptions) {
				o.StateDir, o.PCRBanks, o.PCRBanksSet, o.Cipher, o.ECCCurve = "dir:///s", "sha1,sha256", true, "aes-256-cbc", "p384"
			})},
		{"take-ownership implies createek", []string{"--take-ownership"}, def(func(o *swtpm.SetupOptions) { o.CreateEK = true })},
		{"certificates imply createek", []string{"--create-platform-cert"}, def(func(o *swtpm.SetupOptions) { o.CreateEK, o.PlatformCert = true, true })},
		{"non-options and -- are ignored", []string{"stray", "-x", "--", "--tpm2"}, def(func(o *swtpm.SetupOptions) { o.TPM2 = true })},
		{"a value may start with a dash", []string{"--vmid", "-h"}, def(func(o *swtpm.SetupOptions) { o.VMID = "-h" })},
		{"-h", []string{"-h"}, def(func(o *swtpm.SetupOptions) { o.Help = true })},
		{"optional argument not taken", []string{"--create-config-files", "skip-if-exist", "--tpm2"},
			def(func(o *swtpm.SetupOptions) { o.CreateConfigFiles, o.TPM2 = true, true })},
		{"optional argument attached", []string{"--create-config-files=skip-if-exist"}, def(func(o *swtpm.SetupOptions) { o.CreateConfigFiles = true })},
		{"ignored options", []string{"--tpm", "/usr/bin/swtpm", "--swtpm_ioctl", "x", "--config", "c", "--display", "--ownerpass", "p", "--srk-well-known"},
			def(func(*swtpm.SetupOptions) {})},
		{"empty value", []string{"--pcr-banks="}, def(func(o *swtpm.SetupOptions) { o.PCRBanksSet = true })},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := swtpm.ParseSetup(tc.args)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ParseSetup(%q) =\n  %+v\nwant\n  %+v", tc.args, *got, *tc.want)
			}
		})
	}
}

func TestParseSetupErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--tpm2", "--foo"}, "unrecognized option '--foo'"},
		{[]string{"--foo=bar"}, "unrecognized option '--foo=bar'"},
		{[]string{"--=x"}, "unrecognized option '--=x'"},
		{[]string{"--tpm-state", "/s", "--vmid"}, "option '--vmid' requires an argument"},
		{[]string{"--tpm2=yes"}, "option '--tpm2' doesn't allow an argument"},
		{[]string{"--tpm2=true"}, "option '--tpm2' doesn't allow an argument"},
		{[]string{"--help="}, "option '--help' doesn't allow an argument"},
	}
	for _, tc := range tests {
		t.Run(tc.want, func(t *testing.T) {
			_, err := swtpm.ParseSetup(tc.args)
			if err == nil || err.Error() != tc.want || !swtpm.IsUsage(err) {
				t.Errorf("ParseSetup(%q): %v; want usage error %q", tc.args, err, tc.want)
			}
		})
	}
}

func TestSetupKeyOption(t *testing.T) {
	tests := []struct {
		o       swtpm.SetupOptions
		want    string
		wantErr bool
	}{
		{swtpm.SetupOptions{Cipher: "aes-128-cbc"}, "", false},
		{swtpm.SetupOptions{PwdFile: "/p", Cipher: "aes-256-cbc"}, "pwdfile=/p,mode=aes-256-cbc", false},
		{swtpm.SetupOptions{KeyFileFD: "3", Cipher: "aes-128-cbc"}, "fd=3,mode=aes-128-cbc", false},
		{swtpm.SetupOptions{KeyFile: "/k", PwdFileFD: "4"}, "", true},
	}
	for _, tc := range tests {
		got, err := tc.o.KeyOption()
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("%+v.KeyOption() = %q, %v; want %q, error %v", tc.o, got, err, tc.want, tc.wantErr)
		}
	}
}
