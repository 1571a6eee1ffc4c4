package vm

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestSummaryRow(t *testing.T) {
	tests := []struct {
		s    Summary
		want []string
	}{
		{Summary{Name: "a", UUID: "u", State: "running", Firmware: "uefi", SecureBoot: true, TPM: "enabled"}, []string{"a", "u", "running", "uefi", "on", "enabled"}},
		{Summary{Name: "b", UUID: "v", State: "stopped", Firmware: "bios", TPM: "none"}, []string{"b", "v", "stopped", "bios", "off", "none"}},
		{Summary{Name: "c", UUID: "w", State: "broken", TPM: "?"}, []string{"c", "w", "broken", "?", "?", "?"}},
	}
	for _, tt := range tests {
		if got := tt.s.Row(); !slices.Equal(got, tt.want) || len(got) != len(ListColumns) {
			t.Errorf("Row() = %q, want %q", got, tt.want)
		}
	}
}

func TestStopAndStartWording(t *testing.T) {
	stops := []struct {
		s    Stopped
		want string
	}{
		{Stopped{PoweredOff: true, Timeout: time.Minute}, "powered off"},
		{Stopped{Timeout: time.Minute}, "quit (the guest did not power off within 1m0s)"},
		{Stopped{}, "quit"},
	}
	for _, tt := range stops {
		if got := tt.s.How(); got != tt.want {
			t.Errorf("%+v.How() = %q, want %q", tt.s, got, tt.want)
		}
	}
	if got := (&Started{TPMPid: 42}).TPM(); got != "vTPM pid 42" {
		t.Errorf("Started.TPM() = %q, want vTPM pid 42", got)
	}
	if got := (&Started{}).TPM(); got != "no TPM" {
		t.Errorf("Started.TPM() without one = %q, want no TPM", got)
	}
}

func TestTPMStatus(t *testing.T) {
	tests := []struct {
		c    Config
		want string
	}{
		{Config{}, "none"},
		{Config{TPM: &TPM{Enabled: true}}, "enabled"},
		{Config{TPM: &TPM{}}, "disabled"},
		{Config{Template: true, TPMRequired: true}, "required"},
		{Config{Template: true}, "none"},
	}
	for _, tc := range tests {
		if got := tc.c.TPMStatus(); got != tc.want {
			t.Errorf("%+v: TPMStatus() = %q, want %q", tc.c, got, tc.want)
		}
	}
}

func TestList(t *testing.T) {
	h := testHost(t)
	for _, name := range []string{"a", "b"} {
		if _, err := h.Create(CreateOptions{Name: name, OS: Linux, NoDisk: true}); err != nil {
			t.Fatal(err)
		}
	}
	b, err := h.Open("b")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(b.Dir, "vm.json")); err != nil {
		t.Fatal(err)
	}
	running, err := h.List(false)
	if err != nil || running == nil || len(running) != 0 {
		t.Errorf("List(false) = %v, %v; want an empty list: nothing runs", running, err)
	}
	all, err := h.List(true)
	if err != nil || len(all) != 2 {
		t.Fatalf("List(true) = %+v, %v; want both VMs", all, err)
	}
	if a := all[0]; a.Name != "a" || a.State != "stopped" || a.TPM != "none" || a.Firmware != "uefi" || a.Error != "" {
		t.Errorf("a: %+v; want stopped, no TPM, uefi", a)
	}
	if b := all[1]; b.Name != "b" || b.State != "broken" || b.TPM != "?" || b.Error == "" {
		t.Errorf("b: %+v; want broken with its reason", b)
	}
}
