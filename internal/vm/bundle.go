package vm

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

// CreateOptions describe a new VM.
type CreateOptions struct {
	Name     string
	OS       OS
	Firmware Firmware // "" is UEFI
	// TPM asks for a vTPM; nil is the profile's default (windows11: yes).
	TPM *bool
	// Disk is an existing disk image or block device to boot from; a block
	// device is a passthrough disk. Empty makes a new qcow2 image of
	// DiskSize (default 20G) unless NoDisk is set.
	Disk     string
	DiskSize string
	NoDisk   bool
	// Passthrough are host block devices handed to the guest as they are.
	Passthrough []string
	Memory      string
	CPUs        int
	Kernel      string
	Initrd      string
	Append      string
	Isolation   string
	// Path is the bundle directory; default <data root>/vms/<name>.
	Path string
}

// Created is what Create made.
type Created struct {
	VM    *VM
	Notes []string
	// Warnings are what the user must know about the VM made (a shared
	// EK), apart from the notes.
	Warnings []string
	// Next are actions the user may want to take now.
	Next []errdefs.Remedy
}

// newConfig applies the profile's defaults and rules.
func newConfig(o CreateOptions) (*Config, error) {
	if err := validName(o.Name); err != nil {
		return nil, err
	}
	if o.OS == "" {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "give the guest OS with --os (windows11, windows10, windows-server, linux or other): it chooses the firmware, Secure Boot and TPM rules")
	}
	if _, err := ParseOS(string(o.OS)); err != nil {
		return nil, err
	}
	c := &Config{
		Name: o.Name, UUID: uuid.New(), OS: o.OS, Firmware: o.Firmware,
		Memory: o.Memory, CPUs: o.CPUs, Kernel: o.Kernel, Initrd: o.Initrd, Append: o.Append,
		Isolation: o.Isolation, Created: time.Now().UTC().Truncate(time.Second),
	}
	if c.Firmware == "" {
		c.Firmware = UEFI
	}
	if c.Memory == "" {
		c.Memory = map[bool]string{true: "4G", false: "1G"}[c.OS.Windows()]
	}
	if c.CPUs == 0 {
		c.CPUs = map[bool]int{true: 2, false: 1}[c.OS.Windows()]
	}
	switch c.Isolation {
	case IsolationDefault, IsolationPreferred, IsolationRequired:
	default:
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "isolation %q: want preferred or required", c.Isolation)
	}
	if err := checkCreateSizes(c, o); err != nil {
		return nil, err
	}
	if (c.Kernel == "") != (c.Initrd == "") && c.Initrd != "" {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "--initrd needs --kernel")
	}
	for _, f := range []struct {
		flag string
		path *string
	}{{"--kernel", &c.Kernel}, {"--initrd", &c.Initrd}} {
		if *f.path == "" {
			continue
		}
		p, err := bootFile(f.flag, *f.path)
		if err != nil {
			return nil, err
		}
		*f.path = p
	}
	if o.Disk != "" {
		d, err := diskFor(o.Disk)
		if err != nil {
			return nil, err
		}
		c.Disks = append(c.Disks, d)
	}
	for _, p := range o.Passthrough {
		abs, err := filepath.Abs(p)
		if err != nil {
			return nil, err
		}
		c.Disks = append(c.Disks, Disk{Path: abs, Format: "raw", Passthrough: true})
	}
	wantTPM := c.OS == Windows11
	if o.TPM != nil {
		wantTPM = *o.TPM
	}
	if c.OS == Windows11 && c.Firmware == UEFI {
		c.SecureBoot = true
	}
	if wantTPM {
		if err := CanHaveTPM(c); err != nil && c.OS != Windows11 {
			return nil, err
		}
		c.TPM = &TPM{Enabled: true, Device: DefaultTPMDevice}
		c.SecureBoot = c.Firmware == UEFI
	}
	if err := checkProfile(c); err != nil {
		return nil, err
	}
	if c.TPM != nil {
		if err := CanHaveTPM(c); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// diskFor describes an existing disk given with --disk.
func diskFor(path string) (Disk, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return Disk{}, err
	}
	st, err := os.Stat(abs)
	if err != nil {
		return Disk{}, errdefs.Wrap(errdefs.ErrNotFound, err, "disk %s", path).
			With(errdefs.Advise("give an existing image or device, or --disk-size SIZE for a new image"))
	}
	if st.Mode()&fs.ModeDevice != 0 {
		// A raw physical disk or partition.
		return Disk{Path: abs, Format: "raw", Passthrough: true}, nil
	}
	f := "raw"
	if strings.HasSuffix(abs, ".qcow2") {
		f = "qcow2"
	}
	return Disk{Path: abs, Format: f}, nil
}

// Create makes a bundle, registers it, and manufactures its vTPM when it
// gets one. On failure nothing is left behind.
func (h *Registry) Create(o CreateOptions) (_ *Created, err error) {
	if o.Disk != "" && (o.DiskSize != "" || o.NoDisk) {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "give one of --disk PATH, --disk-size SIZE or --no-disk")
	}
	c, err := newConfig(o)
	if err != nil {
		return nil, err
	}
	if e, err := h.Find(c.Name); err == nil {
		return nil, fmt.Errorf("a VM named %s is %w on this host (%s); pick another name", c.Name, ErrConflict, e.Path)
	}
	dir := o.Path
	if dir == "" {
		dir = filepath.Join(h.VMsDir(), c.Name)
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return nil, err
	}
	if err := makeBundleDir(dir); err != nil {
		return nil, err
	}
	v := &VM{Dir: dir, Config: c, host: h}
	registered := false
	defer func() {
		if err != nil {
			if registered {
				h.Unregister(c.UUID.String())
			}
			os.RemoveAll(dir)
		}
	}()
	if c.Firmware == UEFI {
		_, tmpl := firmwareFiles(c)
		if err := copyFile(tmpl, filepath.Join(dir, VarsFile), 0o600); err != nil {
			return nil, fmt.Errorf("copy the UEFI variable store %s (is the ovmf package installed?): %w", tmpl, err)
		}
	}
	if o.Disk == "" && !o.NoDisk && len(o.Passthrough) == 0 {
		size := o.DiskSize
		if size == "" {
			size = "20G"
		}
		n, err := ParseDiskSize(size)
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "--disk-size")
		}
		// The size is digits by now and "--" ends the options: no value
		// here can be read as one.
		out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "--", filepath.Join(dir, diskName), FormatSize(n)).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("create a %s disk with qemu-img (install qemu-utils, or give --disk PATH): %v: %s", size, err, strings.TrimSpace(string(out)))
		}
		c.Disks = append([]Disk{{Path: diskName, Format: "qcow2"}}, c.Disks...)
	}
	if err := os.MkdirAll(filepath.Join(dir, LogDir), 0o700); err != nil {
		return nil, err
	}
	// The paths outside the bundle this command was given are the local
	// administrator's choice: they join the host's allow list once the VM
	// exists. Until then the VM is checked as if they had.
	hc, err := h.HostConfig()
	if err != nil {
		return nil, err
	}
	outside := c.outsidePaths(hc)
	withNew := &HostConfig{AllowedPaths: append(slices.Clone(hc.AllowedPaths), outside...)}
	if err := c.validate(filepath.Join(dir, ConfigFile), dir, withNew); err != nil {
		return nil, err
	}
	if err := v.Save(); err != nil {
		return nil, err
	}
	if err := h.update(func(r *registry) error { return r.add(Entry{Name: c.Name, UUID: c.UUID, Path: dir}) }); err != nil {
		return nil, err
	}
	registered = true
	res := &Created{VM: v}
	if c.TPM != nil {
		if _, err := h.manufactureTPM(v); err != nil {
			return nil, err
		}
		res.Notes = append(res.Notes, fmt.Sprintf("%s has a manufactured vTPM (EK certificates from this host's CA) and Secure Boot on", c.Name))
	}
	if len(outside) > 0 {
		if _, err := h.AllowPaths(outside...); err != nil {
			return nil, err
		}
		res.Notes = append(res.Notes, fmt.Sprintf("this host now allows its VMs to use %s (given to vm create; bundles name no host paths of their own)",
			strings.Join(outside, ", ")))
	}
	return res, nil
}

// checkCreateSizes checks the sizes and counts a create was given; zero
// values are the profile's defaults.
func checkCreateSizes(c *Config, o CreateOptions) error {
	if _, err := ParseMemory(c.Memory); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, err, "--memory")
	}
	if err := CheckCPUs(c.CPUs); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, err, "--cpus")
	}
	if o.DiskSize != "" {
		if _, err := ParseDiskSize(o.DiskSize); err != nil {
			return errdefs.Wrap(errdefs.ErrInvalidArgument, err, "--disk-size")
		}
	}
	return nil
}

// bootFile checks a --kernel or --initrd file and returns its absolute path.
func bootFile(flag, p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	st, err := os.Stat(abs)
	if errors.Is(err, fs.ErrNotExist) {
		return "", errdefs.Wrap(errdefs.ErrNotFound, err, "%s %s", flag, p)
	}
	if err != nil {
		return "", errdefs.Wrap(errdefs.ErrInvalidArgument, err, "%s %s", flag, p)
	}
	if !st.Mode().IsRegular() {
		return "", errdefs.New(errdefs.ErrInvalidArgument, "%s %s is not a regular file", flag, p)
	}
	return abs, nil
}

// outsidePaths are the absolute paths c names that hc does not allow yet.
func (c *Config) outsidePaths(hc *HostConfig) []string {
	var out []string
	add := func(p string) {
		if filepath.IsAbs(p) && !hc.Allows(p) && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	for _, d := range c.Disks {
		add(d.Path)
	}
	add(c.Kernel)
	add(c.Initrd)
	return out
}

// makeBundleDir creates dir, which must not exist or be empty.
func makeBundleDir(dir string) error {
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		return errdefs.New(errdefs.ErrAlreadyExists, "%s already exists and is not empty; give another --path or remove it", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create bundle directory: %w", err)
	}
	return nil
}

// TPMMode says what a clone's TPM is.
type TPMMode string

// Clone TPM modes.
const (
	TPMNew  TPMMode = "new"  // a freshly manufactured TPM: new identity and certificates
	TPMCopy TPMMode = "copy" // the same TPM contents under a new data key; the EK is shared
	TPMNone TPMMode = "none" // no TPM
)

// ParseTPMMode checks a --tpm value.
func ParseTPMMode(s string) (TPMMode, error) {
	switch m := TPMMode(s); m {
	case TPMNew, TPMCopy, TPMNone:
		return m, nil
	}
	return "", errdefs.New(errdefs.ErrInvalidArgument, "--tpm %q: want new, copy or none", s)
}

// copyBundle copies src's bundle into the new directory dir without TPM
// state, logs or backups, with disks outside the bundle copied in, and
// returns the new VM (not yet saved or registered) with a new UUID.
func (h *Registry) copyBundle(src *VM, name, dir string) (*VM, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	if e, err := h.Find(name); err == nil {
		return nil, fmt.Errorf("a VM named %s is %w on this host (%s); pick another name", name, ErrConflict, e.Path)
	}
	for _, d := range src.Config.Disks {
		if d.Passthrough {
			return nil, errdefs.New(errdefs.ErrFailedPrecondition, "VM %s uses the passthrough disk %s, which two VMs cannot share; copy it into an image "+
				"(`qemu-img convert -O qcow2 %s disk.qcow2`) and recreate the VM with --disk first", src.Name(), d.Path, d.Path)
		}
	}
	if dir == "" {
		dir = filepath.Join(h.VMsDir(), name)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := makeBundleDir(dir); err != nil {
		return nil, err
	}
	skip := func(rel string) bool {
		top := strings.Split(rel, string(filepath.Separator))[0]
		return top == TPMDir || top == LogDir || top == ConfigFile || strings.HasSuffix(top, ".tmp") || strings.HasPrefix(top, VarsFile+".")
	}
	if err := copyTree(src.Dir, dir, skip); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("copy bundle %s: %w", src.Dir, err)
	}
	os.MkdirAll(filepath.Join(dir, LogDir), 0o700)
	c := *src.Config
	c.Name, c.UUID, c.Created = name, uuid.New(), time.Now().UTC().Truncate(time.Second)
	c.Disks = nil
	for i, d := range src.Config.Disks {
		if filepath.IsAbs(d.Path) {
			base := fmt.Sprintf("disk%d-%s", i, filepath.Base(d.Path))
			if err := copyFile(d.Path, filepath.Join(dir, base), 0o600); err != nil {
				os.RemoveAll(dir)
				return nil, fmt.Errorf("copy disk %s: %w", d.Path, err)
			}
			d.Path = base
		}
		c.Disks = append(c.Disks, d)
	}
	if src.Config.TPM != nil {
		t := *src.Config.TPM
		c.TPM = &t
	}
	return &VM{Dir: dir, Config: &c, host: h}, nil
}

// finish saves and registers a new bundle made by copyBundle, then runs
// tpm (if not nil) to give it its TPM; on failure the bundle is removed.
func (h *Registry) finish(v *VM, tpm func() error) (err error) {
	registered := false
	defer func() {
		if err != nil {
			if registered {
				h.Unregister(v.Config.UUID.String())
			}
			os.RemoveAll(v.Dir)
		}
	}()
	if err := v.Save(); err != nil {
		return err
	}
	if err := h.update(func(r *registry) error { return r.add(Entry{Name: v.Name(), UUID: v.Config.UUID, Path: v.Dir}) }); err != nil {
		return err
	}
	registered = true
	if tpm != nil {
		return tpm()
	}
	return nil
}

// Clone copies a stopped VM into a new VM with its own UUID. Its TPM is new
// (fresh identity), a copy (same contents under a new key), or none.
func (h *Registry) Clone(src *VM, name string, mode TPMMode, dir string) (*Created, error) {
	if src.Config.Template {
		return nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s is a template; make VMs from it", src.Name()).
			With(do(errdefs.ActionVMDeploy, "template", src.Name(), "new", name))
	}
	if mode == TPMNone {
		if err := requireTPMKept(src.Config, name, "cloning without a TPM (--tpm none)"); err != nil {
			return nil, err
		}
	}
	if mode == TPMCopy && !src.Config.HasTPM() {
		return nil, errdefs.New(errdefs.ErrFailedPrecondition, "VM %s has no TPM to copy; clone it with --tpm none", src.Name())
	}
	if err := h.requireStopped(src, "clone it (its disk and TPM state change while it runs)"); err != nil {
		return nil, err
	}
	v, err := h.copyBundle(src, name, dir)
	if err != nil {
		return nil, err
	}
	res := &Created{VM: v}
	var tpm func() error
	switch {
	case !src.Config.HasTPM():
	case mode == TPMNone:
		v.Config.TPM = nil
		res.Notes = append(res.Notes, fmt.Sprintf("%s has no TPM (--tpm none)", name))
		res.Next = append(res.Next, do(errdefs.ActionTPMAdd, "vm", name).WithNote("add one"))
	case mode == TPMNew:
		tpm = func() error { _, err := h.manufactureTPM(v); return err }
		res.Notes = append(res.Notes, fmt.Sprintf("%s has a new vTPM: its own EK and certificates; secrets sealed to %s's TPM do not open in it", name, src.Name()))
	case mode == TPMCopy:
		tpm = func() error { return h.copyTPM(src.TPMDir(), v.TPMDir()) }
		res.Warnings = append(res.Warnings, fmt.Sprintf("WARNING: %s and %s now share one EK (the TPM was copied): attestation cannot tell them apart, "+
			"and whatever trusts that EK trusts both. Use --tpm new unless the copy replaces the original", name, src.Name()))
	}
	return res, h.finish(v, tpm)
}

// Template makes a template from a stopped VM: the bundle without any TPM
// state, marked "TPM required" when the VM had a TPM.
func (h *Registry) Template(src *VM, name, dir string) (*Created, error) {
	if err := h.requireStopped(src, "make a template of it"); err != nil {
		return nil, err
	}
	v, err := h.copyBundle(src, name, dir)
	if err != nil {
		return nil, err
	}
	v.Config.Template = true
	v.Config.TPMRequired = src.Config.HasTPM() || src.Config.TPMRequired
	v.Config.TPM = nil
	res := &Created{VM: v}
	if v.Config.TPMRequired {
		res.Notes = append(res.Notes, fmt.Sprintf("template %s holds no TPM secrets and is marked \"TPM required\": each VM deployed from it gets a freshly manufactured vTPM", name))
	}
	return res, h.finish(v, nil)
}

// Deploy creates a VM from a template; a template marked "TPM required"
// gives it a freshly manufactured vTPM.
func (h *Registry) Deploy(tmpl *VM, name, dir string) (*Created, error) {
	if !tmpl.Config.Template {
		return nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s is not a template; make one, or copy the VM", tmpl.Name()).
			With(do(errdefs.ActionVMTemplate, "vm", tmpl.Name()), do(errdefs.ActionVMClone, "vm", tmpl.Name(), "new", name))
	}
	v, err := h.copyBundle(tmpl, name, dir)
	if err != nil {
		return nil, err
	}
	v.Config.Template, v.Config.TPMRequired = false, false
	res := &Created{VM: v}
	var tpm func() error
	if tmpl.Config.TPMRequired {
		v.Config.TPM = &TPM{Enabled: true, Device: DefaultTPMDevice}
		if err := CanHaveTPM(v.Config); err != nil {
			os.RemoveAll(v.Dir)
			return nil, err
		}
		tpm = func() error { _, err := h.manufactureTPM(v); return err }
		res.Notes = append(res.Notes, fmt.Sprintf("%s has a freshly manufactured vTPM", name))
	}
	return res, h.finish(v, tpm)
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	// io.Copy uses copy_file_range, which keeps sparse images sparse on
	// most file systems.
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
	}
	return err
}

// copyTree copies the regular files, directories and symlinks under src to
// dst; skip (given paths relative to src) leaves entries out.
func copyTree(src, dst string, skip func(rel string) bool) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		if rel == "." {
			return os.MkdirAll(dst, 0o700)
		}
		if skip != nil && skip(rel) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return os.MkdirAll(target, info.Mode().Perm())
		case d.Type()&fs.ModeSymlink != 0:
			l, err := os.Readlink(path)
			if err != nil {
				return err
			}
			return os.Symlink(l, target)
		case d.Type().IsRegular():
			return copyFile(path, target, info.Mode().Perm())
		}
		return nil // sockets, pipes: run-time leftovers
	})
}
