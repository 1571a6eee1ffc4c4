package vm

import (
	"fmt"
	"io"
	"os"
	"strings"
)

// Summary is a VM as lists show it.
type Summary struct {
	Name       string `json:"name"`
	UUID       string `json:"uuid"`
	Path       string `json:"path"`
	State      string `json:"state"` // a RunState, "template", or "broken" for a bundle that does not open
	OS         string `json:"os,omitempty"`
	Firmware   string `json:"firmware,omitempty"`
	SecureBoot bool   `json:"secure_boot"`
	TPM        string `json:"tpm"` // see Config.TPMStatus
	Template   bool   `json:"template,omitempty"`
	QEMUPid    int    `json:"qemu_pid,omitempty"`
	TPMPid     int    `json:"tpm_pid,omitempty"`
	Error      string `json:"error,omitempty"` // why a broken bundle does not open
}

// ListColumns head the columns of [Summary.Row].
var ListColumns = []string{"NAME", "UUID", "STATE", "FIRMWARE", "SECURE BOOT", "TPM"}

// Row is s as a line of a VM list; a broken bundle's firmware and Secure
// Boot are unknown ("?").
func (s Summary) Row() []string {
	fw, sb := s.Firmware, onOff(s.SecureBoot)
	if s.State == "broken" {
		fw, sb = "?", "?"
	}
	return []string{s.Name, s.UUID, s.State, fw, sb, s.TPM}
}

// SecureBootStatus is "on" or "off".
func (c *Config) SecureBootStatus() string { return onOff(c.SecureBoot) }

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// WriteText writes v, whose run state is state (see [Summary]), as text:
// one setting a line.
func (v *VM) WriteText(w io.Writer, state string) {
	c := v.Config
	fmt.Fprintf(w, "name:        %s\nuuid:        %s\nbundle:      %s\nstate:       %s\nos:          %s\nfirmware:    %s\nsecure boot: %s\ntpm:         %s\nmemory:      %s\ncpus:        %d\n",
		c.Name, c.UUID, v.Dir, state, c.OS, c.Firmware, c.SecureBootStatus(), c.TPMStatus(), c.Memory, c.CPUs)
	for _, d := range c.Disks {
		fmt.Fprintf(w, "disk:        %s (%s)\n", d.Path, d.Kind())
	}
	if c.Kernel != "" {
		fmt.Fprintf(w, "kernel:      %s\ninitrd:      %s\nappend:      %s\n", c.Kernel, c.Initrd, c.Append)
	}
	fmt.Fprintf(w, "isolation:   %s\n", c.IsolationPolicy())
}

// TPMStatus is "none", "enabled" or "disabled", or "required" for a
// template whose VMs get a fresh TPM.
func (c *Config) TPMStatus() string {
	switch {
	case c.Template && c.TPMRequired:
		return "required"
	case c.TPM == nil:
		return "none"
	case c.TPM.Enabled:
		return "enabled"
	}
	return "disabled"
}

// Summary returns v with its run state.
func (h *Registry) Summary(v *VM) Summary {
	c := v.Config
	s := Summary{Name: c.Name, UUID: c.UUID.String(), Path: v.Dir, OS: string(c.OS), Firmware: string(c.Firmware),
		SecureBoot: c.SecureBoot, TPM: c.TPMStatus(), Template: c.Template}
	st := h.State(v)
	s.State, s.QEMUPid, s.TPMPid = st.String(), st.QEMU, st.TPM
	if c.Template {
		s.State = "template"
	}
	return s
}

// List returns the registered VMs that run (QEMU, or only their vTPM) or,
// with all, every one: stopped VMs, templates, and bundles that do not open
// (state "broken", with the reason in Error).
func (h *Registry) List(all bool) ([]Summary, error) {
	entries, err := h.Entries()
	if err != nil {
		return nil, err
	}
	list := []Summary{}
	for _, e := range entries {
		v, err := h.Open(e.UUID.String())
		if err != nil {
			if all {
				list = append(list, Summary{Name: e.Name, UUID: e.UUID.String(), Path: e.Path, State: "broken", TPM: "?", Error: err.Error()})
			}
			continue
		}
		s := h.Summary(v)
		if all || s.State == "running" || s.State == "tpm-only" {
			list = append(list, s)
		}
	}
	return list, nil
}

// TPMDir resolves a TPM argument to its state directory: a path to one, or
// the name or UUID of a registered VM (its bundle's tpm/). Anything else is
// taken as a path.
func (h *Registry) TPMDir(arg string) string {
	if strings.ContainsRune(arg, os.PathSeparator) || arg == "." || arg == ".." {
		return arg
	}
	if st, err := os.Stat(arg); err == nil && st.IsDir() {
		return arg
	}
	if v, err := h.Open(arg); err == nil {
		return v.TPMDir()
	}
	return arg
}
