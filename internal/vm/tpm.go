package vm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/hostcheck"
	"vtpm/internal/keybroker"
	"vtpm/internal/manufacture"
	"vtpm/internal/state"
)

// firmwareFiles returns the code and variable-store template for c.
func firmwareFiles(c *Config) (code, vars string) { return hostcheck.Firmware(c.SecureBoot) }

// DefaultTPMDevice is QEMU's TPM frontend for new TPMs.
const DefaultTPMDevice = "tpm-crb"

// manufactureTPM makes a fresh TPM in v's tpm directory: new UUID, new data
// key and key protector owned by this host, EKs and certificates from this
// host's CA.
func (h *Registry) manufactureTPM(v *VM) (*manufacture.Report, error) {
	dir := v.TPMDir()
	if state.HasState(dir) {
		return nil, errdefs.New(errdefs.ErrAlreadyExists, "%s already holds TPM state; nothing was changed", dir)
	}
	// A leftover identity or protector (no blobs) would give the TPM an old
	// UUID; start clean.
	if err := state.Remove(dir); err != nil {
		return nil, err
	}
	k, err := h.keys()
	if err != nil {
		return nil, err
	}
	defer k.Close()
	ca, err := manufacture.LoadCA(k.Keystore())
	if err != nil {
		return nil, err
	}
	st, err := state.OpenSealed(k, dir, h.log())
	if err != nil {
		return nil, err
	}
	defer st.Storage.Close()
	rep, err := manufacture.Manufacture(st.Storage, manufacture.Options{
		RSA: true, ECC: manufacture.P256, EKCerts: true, PlatformCert: true, Lock: true,
		PCRBanks: []string{"sha256"},
		Identity: manufacture.Identity{
			TPM: st.TPM, VM: v.Name(),
			PlatformManufacturer: manufacture.DefaultPlatformManufacturer,
			PlatformModel:        manufacture.DefaultPlatformModel,
			PlatformVersion:      manufacture.DefaultPlatformVersion,
		},
		CA: ca,
	})
	if err != nil {
		return nil, fmt.Errorf("manufacture the vTPM of %s: %w", v.Name(), err)
	}
	return rep, nil
}

func (h *Registry) keys() (*keybroker.Broker, error) {
	if h.Keys == nil {
		return nil, errdefs.New(errdefs.ErrInternal, "no keystore opener configured")
	}
	return h.Keys()
}

// AddTPM gives a stopped VM a freshly manufactured vTPM and turns Secure
// Boot on. It returns notes to show the user.
func (h *Registry) AddTPM(v *VM) ([]string, error) {
	c := v.Config
	if c.HasTPM() {
		if !c.TPM.Enabled {
			return nil, errdefs.New(errdefs.ErrAlreadyExists, "VM %s already has a TPM, disabled; reattach it", c.Name).
				With(do(errdefs.ActionTPMEnable, "vm", c.Name))
		}
		return nil, errdefs.New(errdefs.ErrAlreadyExists, "VM %s already has a TPM", c.Name)
	}
	if err := CanHaveTPM(c); err != nil {
		return nil, err
	}
	if err := h.requireStopped(v, "add a TPM to it"); err != nil {
		return nil, err
	}
	if _, err := h.manufactureTPM(v); err != nil {
		os.RemoveAll(v.TPMDir())
		return nil, err
	}
	c.TPM = &TPM{Enabled: true, Device: DefaultTPMDevice}
	var notes []string
	if !c.SecureBoot {
		note, err := v.enableSecureBoot()
		if err != nil {
			return nil, err
		}
		notes = append(notes, note)
	}
	if err := v.Save(); err != nil {
		return nil, err
	}
	return notes, nil
}

// enableSecureBoot switches c to OVMF's Secure Boot build and replaces the
// variable store with one that has Microsoft's keys enrolled; the old store
// is kept beside it.
func (v *VM) enableSecureBoot() (string, error) {
	c := v.Config
	c.SecureBoot = true
	_, tmpl := firmwareFiles(c)
	vars := filepath.Join(v.Dir, VarsFile)
	old := vars + ".before-secureboot"
	if err := os.Rename(vars, old); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("keep the old UEFI variable store: %w", err)
	}
	if err := copyFile(tmpl, vars, 0o600); err != nil {
		return "", fmt.Errorf("install the Secure Boot variable store %s (is the ovmf package installed?): %w", tmpl, err)
	}
	return fmt.Sprintf("Secure Boot is now on for %s (a TPM comes with it): OVMF's Secure Boot firmware, with a UEFI variable store "+
		"that has Microsoft's keys enrolled; the old store is kept as %s, and the firmware recreates its boot entries", c.Name, old), nil
}

// RemovedTPM is what RemoveTPM did.
type RemovedTPM struct {
	// Backup is where the TPM's state is kept.
	Backup string
	// Warning says what the guest loses, and how to get the TPM back.
	Warning string
}

// RemoveTPM detaches and removes a stopped VM's TPM, moving its state into
// a backup under the data root.
func (h *Registry) RemoveTPM(v *VM) (*RemovedTPM, error) {
	c := v.Config
	if !c.HasTPM() {
		return nil, errdefs.New(errdefs.ErrNotFound, "VM %s has no TPM", c.Name)
	}
	if err := requireTPMKept(c, c.Name, "removing its TPM"); err != nil {
		return nil, err
	}
	if err := h.requireStopped(v, "remove its TPM"); err != nil {
		return nil, err
	}
	backup, err := h.backupTPM(v)
	if err != nil {
		return nil, err
	}
	c.TPM = nil
	return &RemovedTPM{Backup: backup, Warning: fmt.Sprintf("WARNING: secrets the guest sealed to this TPM no longer open: BitLocker will ask for its recovery key at the next boot "+
		"(have it ready), and LUKS volumes bound to the TPM need their passphrase. To get the TPM back, stop the VM and move %s back to %s.", backup, v.TPMDir())}, v.Save()
}

// backupTPM moves v's tpm directory to <root>/backups/<name>-<uuid>-<time>/tpm.
func (h *Registry) backupTPM(v *VM) (string, error) {
	src := v.TPMDir()
	if _, err := os.Stat(src); errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	dst := filepath.Join(h.BackupsDir(), fmt.Sprintf("%s-%s-%s", v.Name(), v.Config.UUID, state.Stamp(time.Now())))
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return "", fmt.Errorf("create TPM backup directory: %w", err)
	}
	dst = filepath.Join(dst, TPMDir)
	if err := os.Rename(src, dst); err != nil {
		// Another file system: copy, then remove.
		if err := copyTree(src, dst, nil); err != nil {
			return "", fmt.Errorf("back up TPM state to %s: %w (nothing was removed)", dst, err)
		}
		if err := os.RemoveAll(src); err != nil {
			return "", err
		}
	}
	if err := WriteConfig(filepath.Dir(dst), v.Config); err != nil {
		return "", err
	}
	return dst, nil
}

// SetTPMEnabled attaches (on) or detaches (off) a VM's TPM without touching
// its state or keys. A running VM sees the change at its next start; the
// returned note says so.
func (h *Registry) SetTPMEnabled(v *VM, on bool) (string, error) {
	c := v.Config
	if !c.HasTPM() {
		if on {
			return "", errdefs.New(errdefs.ErrNotFound, "VM %s has no TPM to enable; add one", c.Name).
				With(do(errdefs.ActionTPMAdd, "vm", c.Name))
		}
		return "", errdefs.New(errdefs.ErrNotFound, "VM %s has no TPM to disable", c.Name)
	}
	if on {
		if err := CanHaveTPM(c); err != nil {
			return "", err
		}
		dir := v.TPMDir()
		if !state.HasState(dir) {
			return "", errdefs.New(errdefs.ErrDataLoss, "VM %s's TPM state is missing from %s: restore it from a backup (under %s), or remove the TPM and add a new one",
				c.Name, dir, h.BackupsDir()).
				With(do(errdefs.ActionTPMRemove, "vm", c.Name), do(errdefs.ActionTPMAdd, "vm", c.Name))
		}
	}
	note := ""
	if c.TPM.Enabled == on {
		note = "already " + map[bool]string{true: "enabled", false: "disabled"}[on]
	} else {
		c.TPM.Enabled = on
		if err := v.Save(); err != nil {
			return "", err
		}
	}
	if h.State(v).Running() {
		note = join(note, "takes effect at the next start")
	}
	return note, nil
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// copyTPM copies the sealed TPM state of src into the empty directory dst
// under a new identity: a new TPM UUID, a new data key and a key protector
// owned by this host. Every blob is unsealed with the source's key and
// sealed again for the copy, so the TPM's contents (seeds, EKs, NV, sealed
// objects) are the same and the two state directories share nothing.
func (h *Registry) copyTPM(src, dst string) error {
	if state.IsSwtpm(src) && !state.IsSealed(src) {
		return errdefs.New(errdefs.ErrFailedPrecondition, "%s holds swtpm-format state; convert it to sealed state before copying it", src).
			With(do(errdefs.ActionStateImport, "dir", src))
	}
	k, err := h.keys()
	if err != nil {
		return err
	}
	defer k.Close()
	from, err := state.OpenSealed(k, src, h.log())
	if errors.Is(err, state.ErrLocked) {
		return errdefs.Wrap(errdefs.ErrConflict, err, "the TPM in %s is in use: stop its VM first", src)
	}
	if err != nil {
		return err
	}
	defer from.Close()
	to, err := state.OpenSealed(k, dst, h.log())
	if err != nil {
		return err
	}
	defer to.Close()
	in, out := from.Store, to.Store
	if out.UUID() == in.UUID() {
		return fmt.Errorf("the copy of TPM %s kept its UUID; it must get its own", in.UUID())
	}
	n := 0
	for _, name := range state.Blobs {
		b, err := in.Load(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read %s of TPM %s: %w", name, in.UUID(), err)
		}
		err = out.Store(name, b)
		clear(b)
		if err != nil {
			return fmt.Errorf("write %s of the copy: %w", name, err)
		}
		n++
	}
	if n == 0 {
		return fmt.Errorf("TPM %s in %s has no state to copy", in.UUID(), src)
	}
	if _, err := os.Stat(filepath.Join(src, keybroker.PolicyFile)); err == nil {
		p, err := keybroker.ReadPolicy(src)
		if err != nil {
			return err
		}
		if err := keybroker.WritePolicy(dst, p); err != nil {
			return err
		}
	}
	return out.Close()
}
