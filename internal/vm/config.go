package vm

import (
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
	"vtpm/internal/sandbox"
)

// ConfigFile is the bundle's description, at its root.
const ConfigFile = "vm.json"

// Bundle layout, relative to the bundle directory.
const (
	VarsFile = "OVMF_VARS.fd" // the VM's UEFI variable store
	TPMDir   = "tpm"          // sealed TPM state and key protector
	LogDir   = "logs"         // serial.log, qemu.log, tpm.log
	diskName = "disk.qcow2"   // a disk made by --disk-size
)

const configFormat = 1

// OS is a guest OS profile: it chooses defaults and the rules that apply.
type OS string

// Guest OS profiles.
const (
	Windows11     OS = "windows11"
	Windows10     OS = "windows10"
	WindowsServer OS = "windows-server"
	Linux         OS = "linux"
	Other         OS = "other"
)

// OSes lists the profiles in the order help texts show them.
var OSes = []OS{Windows11, Windows10, WindowsServer, Linux, Other}

// Windows reports whether the profile is a Windows guest.
func (o OS) Windows() bool { return strings.HasPrefix(string(o), "windows") }

// ParseOS checks an --os value.
func ParseOS(s string) (OS, error) {
	if i := slices.Index(OSes, OS(s)); i >= 0 {
		return OSes[i], nil
	}
	names := make([]string, len(OSes))
	for i, o := range OSes {
		names[i] = string(o)
	}
	return "", errdefs.New(errdefs.ErrInvalidArgument, "unknown OS %q: want one of %s", s, strings.Join(names, ", "))
}

// Firmware is the VM's firmware type.
type Firmware string

// Firmware types.
const (
	UEFI Firmware = "uefi"
	BIOS Firmware = "bios"
)

// ParseFirmware checks a --firmware value.
func ParseFirmware(s string) (Firmware, error) {
	switch Firmware(strings.ToLower(s)) {
	case UEFI:
		return UEFI, nil
	case BIOS:
		return BIOS, nil
	}
	return "", errdefs.New(errdefs.ErrInvalidArgument, "unknown firmware %q: want uefi or bios", s)
}

// Disk is one disk of a VM.
type Disk struct {
	// Path is absolute, or relative to the bundle for disks inside it.
	Path   string `json:"path"`
	Format string `json:"format"` // qcow2 or raw
	// Passthrough marks a host block device or raw physical partition
	// handed to the guest as is.
	Passthrough bool `json:"passthrough,omitempty"`
}

// Kind is d's format, or "passthrough" for a device handed to the guest.
func (d Disk) Kind() string {
	if d.Passthrough {
		return "passthrough"
	}
	return d.Format
}

// TPM is a VM's vTPM.
type TPM struct {
	// Enabled attaches the TPM when the VM starts; a disabled TPM keeps its
	// state and keys, detached.
	Enabled bool `json:"enabled"`
	// Device is QEMU's TPM frontend: tpm-crb (default) or tpm-tis.
	Device string `json:"device"`
}

// Isolation policies a VM's vm.json may name for its vTPM process. The
// field is optional: a VM that names none requires isolation (see
// IsolationPolicy), unlike the swtpm drop-in, whose default is preferred.
const (
	IsolationDefault   = ""                        // not named: sandbox.Required
	IsolationPreferred = string(sandbox.Preferred) // run with what the host offers
	IsolationRequired  = string(sandbox.Required)  // refuse to start without every part
)

// Config is a VM bundle's vm.json.
type Config struct {
	Format   int       `json:"format"`
	Name     string    `json:"name"`
	UUID     uuid.UUID `json:"uuid"`
	OS       OS        `json:"os"`
	Firmware Firmware  `json:"firmware"`
	// SecureBoot selects OVMF's Secure Boot build with a variable store
	// that has Microsoft's keys enrolled.
	SecureBoot bool   `json:"secure_boot"`
	Memory     string `json:"memory"`
	CPUs       int    `json:"cpus"`
	Disks      []Disk `json:"disks,omitempty"`
	// Kernel, Initrd and Append boot a kernel directly (through the
	// firmware, so measured and Secure Boot still apply).
	Kernel string `json:"kernel,omitempty"`
	Initrd string `json:"initrd,omitempty"`
	Append string `json:"append,omitempty"`
	// TPM is nil for a VM without a TPM.
	TPM *TPM `json:"tpm,omitempty"`
	// Isolation is what the VM's policy asks of its vTPM process:
	// "required" (also when empty) or "preferred"; see IsolationPolicy.
	Isolation string `json:"isolation,omitempty"`
	// TPMUser is the user the vTPM process runs as when `vm start` runs as
	// root: "" = tss if that user exists, else nobody (or root, with a
	// warning, when that user cannot reach the VM's files); never root. A
	// non-root caller's vTPM runs as the caller.
	TPMUser string `json:"tpm_user,omitempty"`
	// QEMUUser is the user QEMU runs as when `vm start` runs as root: ""
	// = the first of DefaultQEMUUsers that exists. Never root.
	QEMUUser string `json:"qemu_user,omitempty"`
	// Template marks a template: it is never started, only deployed.
	Template bool `json:"template,omitempty"`
	// TPMRequired: VMs deployed from this template get a fresh vTPM.
	TPMRequired bool      `json:"tpm_required,omitempty"`
	Created     time.Time `json:"created"`
}

// HasTPM reports whether the VM has a TPM, enabled or not.
func (c *Config) HasTPM() bool { return c.TPM != nil }

// TPMEnabled reports whether the VM starts with its TPM attached.
func (c *Config) TPMEnabled() bool { return c.TPM != nil && c.TPM.Enabled }

// Passthrough returns the VM's first passthrough disk, or "".
func (c *Config) Passthrough() string {
	for _, d := range c.Disks {
		if d.Passthrough {
			return d.Path
		}
	}
	return ""
}

// WriteConfig writes dir/vm.json crash-safely.
func WriteConfig(dir string, c *Config) error {
	c.Format = configFormat
	b, err := MarshalConfig(c)
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, ConfigFile), b, 0o644)
}

// validName: names become directory names and appear in commands.
func validName(name string) error {
	if name == "" {
		return errdefs.New(errdefs.ErrInvalidArgument, "a VM needs a name")
	}
	if len(name) > 64 {
		return errdefs.New(errdefs.ErrInvalidArgument, "VM name %q is longer than 64 characters", name)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return errdefs.New(errdefs.ErrInvalidArgument, "VM name %q: use letters, digits, '-', '_' and '.' only", name)
		}
	}
	if name[0] == '.' || name[0] == '-' {
		return errdefs.New(errdefs.ErrInvalidArgument, "VM name %q must start with a letter or digit", name)
	}
	if _, err := uuid.Parse(name); err == nil {
		return errdefs.New(errdefs.ErrInvalidArgument, "VM name %q looks like a UUID; VMs are found by name or UUID, so pick another name", name)
	}
	return nil
}

// IsolationPolicy is the VM's effective isolation policy: sandbox.Required
// unless vm.json asks for preferred.
func (c *Config) IsolationPolicy() sandbox.Isolation {
	if c.Isolation == IsolationDefault {
		return sandbox.Required
	}
	return sandbox.Isolation(c.Isolation)
}
