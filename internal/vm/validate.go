package vm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

// maxConfigSize bounds vm.json; real ones are under 2 KiB.
const maxConfigSize = 64 << 10

// maxAppend bounds the kernel command line (Linux's own limit on x86 is 2 KiB
// by default, at most 4 KiB when configured so).
const maxAppend = 4096

// TPMDevices are QEMU's TPM frontends a VM may ask for.
var TPMDevices = []string{"tpm-crb", "tpm-tis"}

// DiskFormats are the disk image formats a VM may use.
var DiskFormats = []string{"qcow2", "raw"}

// ConfigError is a vm.json value that vtpm refuses: the file, the field
// (as JSON names it, "disks[1].path"), the value and why.
type ConfigError struct {
	File  string
	Field string
	Value string
	Why   string
}

func (e *ConfigError) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("%s: %s", e.File, e.Why)
	}
	return fmt.Sprintf("%s: %s %q: %s", e.File, e.Field, e.Value, e.Why)
}

// Is makes a ConfigError an invalid argument.
func (e *ConfigError) Is(target error) bool { return target == errdefs.ErrInvalidArgument }

// PathNotAllowedError is a path outside the bundle, named by the bundle's
// vm.json, that this host has not allowed VMs to use.
type PathNotAllowedError struct {
	File  string // the vm.json
	Field string // "disks[0].path", "kernel", "initrd"
	Path  string
}

func (e *PathNotAllowedError) Error() string {
	return fmt.Sprintf("%s: %s %s is outside the VM's bundle, and this host does not allow VMs to use it "+
		"(a bundle cannot grant itself host files or devices)", e.File, e.Field, e.Path)
}

// Is makes a PathNotAllowedError a permission denied.
func (e *PathNotAllowedError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

// Remedies: allow the path on this host, when its VMs may use it.
func (e *PathNotAllowedError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{errdefs.Do(errdefs.ActionHostAllowPath, "path", e.Path).
		WithNote("if this host's VMs may use %s, allow it", e.Path)}
}

// ReadConfig reads and validates dir/vm.json; host says which paths
// outside the bundle VMs may use (nil: none).
func ReadConfig(dir string, host *HostConfig) (*Config, error) {
	path := filepath.Join(dir, ConfigFile)
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errdefs.New(errdefs.ErrNotFound, "%s is not a VM bundle: it has no %s", dir, ConfigFile)
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, err
	}
	return ParseConfig(b, dir, host)
}

// ParseConfig decodes vm.json's bytes for the bundle in dir and validates
// every field, as the file may come from anywhere: names, UUID, profile,
// sizes and counts within bounds, device models and formats from fixed
// lists, and disk, kernel and initrd paths inside the bundle unless host
// allows them.
func ParseConfig(b []byte, dir string, host *HostConfig) (*Config, error) {
	file := filepath.Join(dir, ConfigFile)
	if len(b) > maxConfigSize {
		return nil, &ConfigError{File: file, Why: fmt.Sprintf("larger than %d bytes", maxConfigSize)}
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "%s is damaged", file).With(errdefs.Advise("restore it from a backup"))
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errdefs.New(errdefs.ErrDataLoss, "%s is damaged: data after its JSON object", file).With(errdefs.Advise("restore it from a backup"))
	}
	if c.Format != configFormat {
		return nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s has format %d; this vtpm reads format %d", file, c.Format, configFormat)
	}
	if c.Name == "" || c.UUID == uuid.Nil {
		return nil, errdefs.New(errdefs.ErrDataLoss, "%s is damaged: it has no name or UUID", file).With(errdefs.Advise("restore it from a backup"))
	}
	if err := c.validate(file, dir, host); err != nil {
		return nil, err
	}
	return &c, nil
}

// validate checks c as it would be written to file in the bundle dir.
func (c *Config) validate(file, dir string, host *HostConfig) error {
	bad := func(field, value, why string) error {
		return &ConfigError{File: file, Field: field, Value: value, Why: why}
	}
	if err := validName(c.Name); err != nil {
		return bad("name", c.Name, err.Error())
	}
	if _, err := ParseOS(string(c.OS)); err != nil {
		return bad("os", string(c.OS), err.Error())
	}
	if c.Firmware != UEFI && c.Firmware != BIOS {
		return bad("firmware", string(c.Firmware), "want uefi or bios")
	}
	if c.SecureBoot && c.Firmware != UEFI {
		return bad("secure_boot", "true", "Secure Boot needs UEFI firmware")
	}
	if _, err := ParseMemory(c.Memory); err != nil {
		return bad("memory", c.Memory, err.Error())
	}
	if err := CheckCPUs(c.CPUs); err != nil {
		return bad("cpus", fmt.Sprint(c.CPUs), err.Error())
	}
	for i, d := range c.Disks {
		field := fmt.Sprintf("disks[%d]", i)
		if !oneOf(d.Format, DiskFormats) {
			return bad(field+".format", d.Format, "want qcow2 or raw")
		}
		if d.Passthrough && !filepath.IsAbs(d.Path) {
			return bad(field+".path", d.Path, "a passthrough disk is a host device, named by its absolute path")
		}
		if err := checkBundlePath(file, field+".path", d.Path, dir, host); err != nil {
			return err
		}
	}
	if c.Initrd != "" && c.Kernel == "" {
		return bad("initrd", c.Initrd, "an initrd needs a kernel")
	}
	for _, f := range []struct{ field, path string }{{"kernel", c.Kernel}, {"initrd", c.Initrd}} {
		if f.path == "" {
			continue
		}
		if err := checkBundlePath(file, f.field, f.path, dir, host); err != nil {
			return err
		}
	}
	if len(c.Append) > maxAppend {
		return bad("append", c.Append[:32]+"…", fmt.Sprintf("longer than %d bytes", maxAppend))
	}
	if err := checkText(c.Append); err != nil {
		return bad("append", c.Append, err.Error())
	}
	if c.TPM != nil && c.TPM.Device != "" && !oneOf(c.TPM.Device, TPMDevices) {
		return bad("tpm.device", c.TPM.Device, "want tpm-crb or tpm-tis")
	}
	switch c.Isolation {
	case IsolationDefault, IsolationPreferred, IsolationRequired:
	default:
		return bad("isolation", c.Isolation, "want preferred or required")
	}
	if c.TPMUser != "" && !validUser(c.TPMUser) {
		return bad("tpm_user", c.TPMUser, "not a user name or uid")
	}
	if c.TPMUser == "root" || c.TPMUser == "0" {
		return bad("tpm_user", c.TPMUser, "a vTPM started as root always drops to an unprivileged user; a bundle cannot ask to keep root")
	}
	if c.QEMUUser != "" && !validUser(c.QEMUUser) {
		return bad("qemu_user", c.QEMUUser, "not a user name or uid")
	}
	if c.QEMUUser == "root" || c.QEMUUser == "0" {
		return bad("qemu_user", c.QEMUUser, "QEMU never runs as root: it runs the guest's devices, the part of a VM a guest attacks")
	}
	return nil
}

// checkBundlePath checks a path vm.json names: a relative path must stay
// inside the bundle dir, symbolic links included; an absolute one must be
// allowed by the host.
func checkBundlePath(file, field, p, dir string, host *HostConfig) error {
	if err := checkPathChars(p); err != nil {
		return &ConfigError{File: file, Field: field, Value: p, Why: err.Error()}
	}
	if strings.Contains(p, ",") {
		// QEMU reads a comma as the end of a value; vtpm escapes them, and
		// still no path it makes has one.
		return &ConfigError{File: file, Field: field, Value: p, Why: "a path in vm.json may not contain a comma"}
	}
	if filepath.IsAbs(p) {
		if filepath.Clean(p) != p {
			return &ConfigError{File: file, Field: field, Value: p, Why: "not a clean path"}
		}
		if !host.Allows(p) {
			return &PathNotAllowedError{File: file, Field: field, Path: p}
		}
		return nil
	}
	if !filepath.IsLocal(p) {
		return &ConfigError{File: file, Field: field, Value: p, Why: "leaves the VM's bundle; a path in vm.json is relative to the bundle and stays inside it"}
	}
	// A link inside the bundle may not lead out of it. A file that does not
	// exist yet is the pre-flight's concern.
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil
	}
	defer root.Close()
	if _, err := root.Stat(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return &ConfigError{File: file, Field: field, Value: p, Why: "leads out of the VM's bundle (" + err.Error() + ")"}
	}
	return nil
}

// checkPathChars refuses what no disk or kernel path needs and what could
// confuse the tools it is handed to: control characters, invalid UTF-8,
// a leading '-'.
func checkPathChars(p string) error {
	if p == "" {
		return errors.New("empty path")
	}
	if p[0] == '-' {
		return errors.New("a path may not start with '-'")
	}
	if len(p) > 4096 {
		return errors.New("path too long")
	}
	return checkText(p)
}

// checkText refuses control characters and invalid UTF-8.
func checkText(s string) error {
	if !utf8.ValidString(s) {
		return errors.New("not valid UTF-8")
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return fmt.Errorf("control character %U", r)
		}
	}
	return nil
}

// userName is a POSIX-portable user name, as useradd accepts them.
// Compiled on first use, not at every vTPM start.
var userName = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[a-z_][a-z0-9_.-]{0,31}$|^[0-9]{1,10}$`) })

func validUser(s string) bool { return userName().MatchString(s) }

func oneOf(s string, set []string) bool {
	for _, x := range set {
		if s == x {
			return true
		}
	}
	return false
}
