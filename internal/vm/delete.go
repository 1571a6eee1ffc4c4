package vm

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// logFiles are the logs vtpm writes in a bundle's logs/.
var logFiles = []string{"serial.log", "qemu.log", "tpm.log"}

// Deleted is what Delete did.
type Deleted struct {
	VM, Dir string // the VM's name and bundle directory
	// Backup is where the TPM state was moved, "" when it was deleted or
	// the VM had none.
	Backup string
	// Kept are the files and directories in the bundle that vtpm did not
	// make, left where they were (with the bundle directory).
	Kept []string
}

// WriteText writes what d deleted and kept as text.
func (d *Deleted) WriteText(w io.Writer) {
	fmt.Fprintf(w, "deleted VM %s (%s)\n", d.VM, d.Dir)
	if d.Backup != "" {
		fmt.Fprintf(w, "its TPM state is kept in %s (with its key protector: it opens only with this host's or another admitted guardian)\n", d.Backup)
	}
	if len(d.Kept) > 0 {
		fmt.Fprintf(w, "kept what vtpm did not make, in %s: %s\n", d.Dir, strings.Join(d.Kept, ", "))
	}
}

// Delete removes a stopped VM's bundle and unregisters it. Only what vtpm
// made goes: vm.json, the UEFI variable stores, the disks inside the
// bundle, the logs and the TPM state, which is moved to a backup under the
// data root (its path is in the result) unless deleteTPM is set. Anything
// else in the bundle (a user's notes, ISOs) stays, and with it the bundle
// directory. Disks outside the bundle are left alone.
func (h *Registry) Delete(v *VM, deleteTPM bool) (*Deleted, error) {
	if err := h.requireStopped(v, "delete it"); err != nil {
		return nil, err
	}
	res := &Deleted{VM: v.Name(), Dir: v.Dir}
	if !deleteTPM {
		var err error
		if res.Backup, err = h.backupTPM(v); err != nil {
			return nil, err
		}
	}
	if _, err := h.Unregister(v.Config.UUID.String()); err != nil {
		return res, err
	}
	if err := removeMade(v, deleteTPM); err != nil {
		return res, fmt.Errorf("VM %s is unregistered, but removing its files from %s failed: %w", v.Name(), v.Dir, err)
	}
	entries, err := os.ReadDir(v.Dir)
	switch {
	case err == nil && len(entries) == 0:
		err = os.Remove(v.Dir)
	case err == nil:
		for _, e := range entries {
			res.Kept = append(res.Kept, filepath.Join(v.Dir, e.Name()))
		}
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return res, err
	}
	os.RemoveAll(h.runDir(v))
	return res, nil
}

// removeMade removes the files of v's bundle that vtpm makes.
func removeMade(v *VM, deleteTPM bool) error {
	var errs []error
	rm := func(rel string) {
		if err := os.Remove(filepath.Join(v.Dir, rel)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if deleteTPM {
		if err := os.RemoveAll(v.TPMDir()); err != nil {
			errs = append(errs, err)
		}
	}
	for _, d := range v.Config.Disks {
		// Relative disks are the ones vtpm made or copied in (create's
		// disk, a clone's copies); validation keeps them inside.
		if !filepath.IsAbs(d.Path) && filepath.IsLocal(d.Path) {
			rm(d.Path)
		}
	}
	for _, f := range logFiles {
		rm(filepath.Join(LogDir, f))
	}
	// logs/ goes only when nothing else is in it.
	if err := os.Remove(filepath.Join(v.Dir, LogDir)); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
		errs = append(errs, err)
	}
	entries, _ := os.ReadDir(v.Dir)
	for _, e := range entries {
		// The variable store, the one Secure Boot replaced
		// (OVMF_VARS.fd.before-secureboot), and leftovers of crash-safe
		// writes (.vm.json.tmp-…).
		n := e.Name()
		if !e.IsDir() && (n == VarsFile || strings.HasPrefix(n, VarsFile+".") || strings.HasPrefix(n, "."+ConfigFile+".tmp-")) {
			rm(n)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	rm(ConfigFile) // last: while it is there, the bundle can be registered again
	return nil
}
