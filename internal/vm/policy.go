package vm

import (
	"errors"
	"fmt"

	"vtpm/internal/errdefs"
)

// RuleError is a request that a VM rule refuses. Rule names it, Error says
// why and how to get what was wanted, Fix the actions that get it. It
// matches errdefs.ErrFailedPrecondition.
type RuleError struct {
	VM   string
	Rule string // "tpm-needs-uefi", "tpm-passthrough", "windows11-needs-tpm", …
	Msg  string
	Fix  []errdefs.Remedy
}

func (e *RuleError) Error() string { return e.Msg }

// Is matches errdefs.ErrFailedPrecondition.
func (e *RuleError) Is(target error) bool { return target == errdefs.ErrFailedPrecondition }

// Remedies returns the actions that get what was wanted.
func (e *RuleError) Remedies() []errdefs.Remedy { return e.Fix }

// IsRule reports whether err is a refusal by the named rule.
func IsRule(err error, rule string) bool {
	var r *RuleError
	return errors.As(err, &r) && r.Rule == rule
}

// CanHaveTPM says whether a vTPM may be attached to c, and if not, why.
func CanHaveTPM(c *Config) error {
	if c.Firmware != UEFI {
		return &RuleError{VM: c.Name, Rule: "tpm-needs-uefi", Msg: fmt.Sprintf(
			"VM %s boots with BIOS firmware, and a vTPM needs UEFI: QEMU's TPM 2.0 is measured and used through UEFI "+
				"(OVMF), and Secure Boot comes with it. Recreate the VM with UEFI, reusing its disk "+
				"(a BIOS-installed guest disk uses MBR; Windows converts it with `mbr2gpt /convert`)",
			c.Name),
			Fix: []errdefs.Remedy{do(errdefs.ActionVMCreate, "os", string(c.OS))}}
	}
	if p := c.Passthrough(); p != "" {
		return &RuleError{VM: c.Name, Rule: "tpm-passthrough", Msg: fmt.Sprintf(
			"VM %s boots from the passthrough disk %s, so it cannot get a vTPM: the disk lives outside the VM's bundle "+
				"and can be booted on the bare machine or by another VM, where this vTPM is absent, so keys sealed to the "+
				"vTPM (BitLocker, LUKS) would lock the disk there; and a VM whose disk is not in its bundle cannot be "+
				"cloned, templated or moved with its TPM. Copy the disk into an image "+
				"(`qemu-img convert -O qcow2 %s disk.qcow2`) and create the VM with `--disk disk.qcow2`",
			c.Name, p, p)}
	}
	if c.Template {
		return &RuleError{VM: c.Name, Rule: "template", Msg: fmt.Sprintf(
			"%s is a template: templates hold no TPM secrets; VMs deployed from it get a fresh vTPM", c.Name),
			Fix: []errdefs.Remedy{do(errdefs.ActionVMDeploy, "template", c.Name)}}
	}
	return nil
}

// checkProfile enforces the OS profile's own rules on a complete config.
func checkProfile(c *Config) error {
	if c.OS != Windows11 || c.Template {
		return nil
	}
	switch {
	case c.Firmware != UEFI:
		return &RuleError{VM: c.Name, Rule: "windows11-needs-uefi", Msg: fmt.Sprintf(
			"Windows 11 requires UEFI firmware with Secure Boot and a TPM 2.0; VM %s was asked for with BIOS firmware. "+
				"Drop --firmware bios (windows11 VMs get UEFI, Secure Boot and a vTPM), or use --os windows10 for a BIOS VM", c.Name)}
	case c.Passthrough() != "":
		return &RuleError{VM: c.Name, Rule: "windows11-needs-tpm", Msg: fmt.Sprintf(
			"Windows 11 requires a TPM 2.0, and VM %s boots from the passthrough disk %s, which cannot have a vTPM. "+
				"Copy the disk into an image (`qemu-img convert -O qcow2 %s disk.qcow2`) and use --disk disk.qcow2",
			c.Name, c.Passthrough(), c.Passthrough())}
	case !c.HasTPM():
		return &RuleError{VM: c.Name, Rule: "windows11-needs-tpm", Msg: fmt.Sprintf(
			"Windows 11 requires a TPM 2.0; VM %s was asked for without one. Drop --tpm=false "+
				"(windows11 VMs get a manufactured vTPM), or use --os windows10", c.Name)}
	case !c.SecureBoot:
		return &RuleError{VM: c.Name, Rule: "windows11-needs-secureboot", Msg: fmt.Sprintf(
			"Windows 11 requires Secure Boot; VM %s was asked for without it", c.Name)}
	}
	return nil
}

// requireTPMKept refuses to leave a Windows 11 VM without a TPM, the rule
// create applies, when what (a clone without one, removing it) would.
func requireTPMKept(c *Config, name, what string) error {
	if c.OS != Windows11 || c.Template {
		return nil
	}
	return &RuleError{VM: name, Rule: "windows11-needs-tpm", Msg: fmt.Sprintf(
		"Windows 11 requires a TPM 2.0, and %s would leave VM %s without one; "+
			"its TPM can be disabled for a while instead (its state and keys stay)", what, name)}
}
