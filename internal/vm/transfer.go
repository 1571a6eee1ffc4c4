package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/state"
)

// TPMKeep is the TPM mode of a move: the TPM travels as it is, sealed, and
// opens only where its key protector admits a guardian.
const TPMKeep TPMMode = "keep"

// Op is what a transfer to another host does with the VM.
type Op string

// Transfer operations.
const (
	OpMove   Op = "move"   // the VM leaves this host: same name, UUID and TPM
	OpCopy   Op = "copy"   // a new VM there, with its own UUID (clone's rules)
	OpDeploy Op = "deploy" // a VM made there from a template, with a fresh TPM
)

// OutFile is one file of a bundle on its way to another host.
type OutFile struct {
	Rel  string      // slash-separated path in the bundle
	Src  string      // the host file to read
	Mode fs.FileMode // permission bits
}

// Outgoing is a stopped VM or template prepared to leave for another host:
// the vm.json the destination registers, the files it receives, and what it
// does about the TPM.
type Outgoing struct {
	Source *VM
	Op     Op
	// Config is the vm.json as the destination registers it.
	Config *Config
	// TPM says what the destination does: keep the TPM that travels
	// (TPMKeep), re-key it under a new identity (TPMCopy), manufacture a
	// fresh one (TPMNew) or none (TPMNone).
	TPM   TPMMode
	Files []OutFile
	// Notes and Warnings are for the user, as Created's.
	Notes, Warnings []string
}

// TPMTravels reports whether the TPM's state is among the files sent.
func (o *Outgoing) TPMTravels() bool { return o.TPM == TPMKeep || o.TPM == TPMCopy }

// Outgoing prepares the stopped VM (or template) v to leave for another
// host by op: name is the new VM's name for a copy or deploy ("" keeps v's
// for a copy), mode the copy's TPM (clone's rules). Disks outside the
// bundle are carried into it; passthrough disks cannot travel.
func (h *Registry) Outgoing(v *VM, op Op, name string, mode TPMMode) (*Outgoing, error) {
	src := v.Config
	if name == "" {
		name = src.Name
	}
	if err := validName(name); err != nil {
		return nil, err
	}
	if err := h.requireStopped(v, fmt.Sprintf("%s it to another host (its disk and TPM state change while it runs)", op)); err != nil {
		return nil, err
	}
	for _, d := range src.Disks {
		if d.Passthrough {
			return nil, errdefs.New(errdefs.ErrFailedPrecondition, "VM %s uses the passthrough disk %s, a device of this host that cannot travel; "+
				"copy it into an image and recreate the VM with --disk first", src.Name, d.Path)
		}
	}
	c := *src
	if src.TPM != nil {
		t := *src.TPM
		c.TPM = &t
	}
	out := &Outgoing{Source: v, Op: op, Config: &c}
	switch op {
	case OpMove:
		if name != src.Name {
			return nil, errdefs.New(errdefs.ErrInvalidArgument, "a move keeps the VM's name; copy it to give it another")
		}
		out.TPM = TPMNone
		if src.HasTPM() {
			out.TPM = TPMKeep
		}
	case OpCopy:
		c.Name, c.UUID, c.Created = name, uuid.New(), time.Now().UTC().Truncate(time.Second)
		switch {
		case src.Template || !src.HasTPM():
			out.TPM = TPMNone
		case mode == TPMNone:
			if err := requireTPMKept(src, name, "copying it without a TPM (--tpm none)"); err != nil {
				return nil, err
			}
			c.TPM, out.TPM = nil, TPMNone
			out.Notes = append(out.Notes, fmt.Sprintf("%s has no TPM (--tpm none)", name))
		case mode == TPMCopy:
			out.TPM = TPMCopy
			out.Warnings = append(out.Warnings, fmt.Sprintf("WARNING: %s and %s now share one EK (the TPM was copied): attestation cannot tell them apart, "+
				"and whatever trusts that EK trusts both. Use --tpm new unless the copy replaces the original", name, src.Name))
		case mode == TPMNew || mode == "":
			out.TPM = TPMNew
			out.Notes = append(out.Notes, fmt.Sprintf("%s has a new vTPM: its own EK and certificates; secrets sealed to %s's TPM do not open in it", name, src.Name))
		default:
			return nil, errdefs.New(errdefs.ErrInvalidArgument, "--tpm %q: want new, copy or none", mode)
		}
		if mode == TPMCopy && !src.HasTPM() {
			return nil, errdefs.New(errdefs.ErrFailedPrecondition, "VM %s has no TPM to copy; copy it with --tpm none", src.Name)
		}
	case OpDeploy:
		if !src.Template {
			return nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s is not a template; make one, or copy the VM", src.Name).
				With(do(errdefs.ActionVMTemplate, "vm", src.Name))
		}
		c.Name, c.UUID, c.Created = name, uuid.New(), time.Now().UTC().Truncate(time.Second)
		c.Template, c.TPMRequired = false, false
		out.TPM = TPMNone
		if src.TPMRequired {
			c.TPM = &TPM{Enabled: true, Device: DefaultTPMDevice}
			if err := CanHaveTPM(&c); err != nil {
				return nil, err
			}
			out.TPM = TPMNew
			out.Notes = append(out.Notes, fmt.Sprintf("%s has a freshly manufactured vTPM", name))
		}
	default:
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "unknown transfer %q: want move, copy or deploy", op)
	}
	if out.TPMTravels() && !state.IsSealed(v.TPMDir()) {
		return nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s holds no sealed TPM state to send; convert swtpm state first", v.TPMDir()).
			With(do(errdefs.ActionStateImport, "dir", v.TPMDir()))
	}
	if err := out.collect(v); err != nil {
		return nil, err
	}
	return out, nil
}

// collect lists the files to send: the bundle's (without logs, leftovers
// of crash-safe writes, or the TPM unless it travels), and the disks
// outside the bundle, which become files in it.
func (o *Outgoing) collect(v *VM) error {
	err := filepath.WalkDir(v.Dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(v.Dir, path)
		if err != nil || rel == "." {
			return err
		}
		top := strings.Split(rel, string(filepath.Separator))[0]
		base := d.Name()
		skip := top == LogDir || top == ConfigFile || strings.HasSuffix(base, ".tmp") || strings.HasPrefix(base, "."+ConfigFile+".tmp-") ||
			strings.HasPrefix(top, VarsFile+".") || (top == TPMDir && !o.TPMTravels()) || (top == TPMDir && base == state.LockFile)
		if skip {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		switch {
		case d.IsDir():
			return nil
		case d.Type().IsRegular():
			info, err := d.Info()
			if err != nil {
				return err
			}
			o.Files = append(o.Files, OutFile{Rel: filepath.ToSlash(rel), Src: path, Mode: info.Mode().Perm()})
			return nil
		case d.Type()&fs.ModeSymlink != 0:
			return errdefs.New(errdefs.ErrFailedPrecondition, "%s is a symbolic link; a bundle that travels holds regular files only: replace it with the file", path)
		}
		return nil // sockets, pipes: run-time leftovers
	})
	if err != nil {
		return fmt.Errorf("list bundle %s: %w", v.Dir, err)
	}
	o.Config.Disks = nil
	for i, d := range v.Config.Disks {
		if filepath.IsAbs(d.Path) {
			base := fmt.Sprintf("disk%d-%s", i, filepath.Base(d.Path))
			st, err := os.Stat(d.Path)
			if err != nil {
				return fmt.Errorf("disk %s: %w", d.Path, err)
			}
			o.Files = append(o.Files, OutFile{Rel: base, Src: d.Path, Mode: st.Mode().Perm() &^ 0o077})
			d.Path = base
		}
		o.Config.Disks = append(o.Config.Disks, d)
	}
	return nil
}

// Arrive registers the bundle received from another host in staged (a
// directory on the data root's file system, whose files were verified) as
// a VM of this host, under <data root>/vms/<name>. tpm says what to do
// about its TPM, as Outgoing.TPM. vm.json is validated as untrusted input
// against this host's configuration. On failure nothing is registered and
// staged and the new bundle are removed.
func (h *Registry) Arrive(staged string, tpm TPMMode) (_ *Created, err error) {
	defer func() {
		if err != nil {
			os.RemoveAll(staged)
		}
	}()
	c, err := h.readConfig(staged)
	if err != nil {
		return nil, err
	}
	if err := h.CheckArrival(c); err != nil {
		return nil, err
	}
	tpmDir := filepath.Join(staged, TPMDir)
	_, statErr := os.Lstat(tpmDir)
	hasTPMFiles := statErr == nil
	switch tpm {
	case TPMKeep, TPMCopy:
		if !c.HasTPM() || !state.IsSealed(tpmDir) || !state.HasState(tpmDir) {
			return nil, errdefs.New(errdefs.ErrDataLoss, "the bundle of VM %s arrived without its TPM's sealed state", c.Name)
		}
	case TPMNew:
		if !c.HasTPM() || hasTPMFiles {
			return nil, errdefs.New(errdefs.ErrInvalidArgument, "VM %s: a fresh TPM was asked for, but the bundle %s", c.Name,
				map[bool]string{true: "holds TPM state", false: "has no TPM in its vm.json"}[hasTPMFiles])
		}
		if err := CanHaveTPM(c); err != nil {
			return nil, err
		}
	case TPMNone:
		if c.HasTPM() || hasTPMFiles {
			return nil, errdefs.New(errdefs.ErrInvalidArgument, "VM %s arrived with a TPM, but none was announced", c.Name)
		}
	default:
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "unknown TPM mode %q", tpm)
	}
	// The TPM that travels for a copy is re-keyed into the bundle's tpm/,
	// then removed; it waits beside it, inside the bundle.
	const received = ".tpm-received"
	if tpm == TPMCopy {
		if err := os.Rename(tpmDir, filepath.Join(staged, received)); err != nil {
			return nil, err
		}
	}
	dir := filepath.Join(h.VMsDir(), c.Name)
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		return nil, errdefs.New(errdefs.ErrAlreadyExists, "%s already exists and is not empty; nothing was changed", dir)
	}
	if err := os.MkdirAll(h.VMsDir(), 0o700); err != nil {
		return nil, err
	}
	if err := os.Rename(staged, dir); err != nil {
		return nil, fmt.Errorf("move the received bundle into place: %w", err)
	}
	v := &VM{Dir: dir, Config: c, host: h}
	var fn func() error
	switch tpm {
	case TPMKeep:
		// Verified bytes are not yet a TPM that runs here: its key must
		// open, and its state read whole, before the source lets it go.
		fn = func() error { return h.checkTPMOpens(v.TPMDir()) }
	case TPMNew:
		fn = func() error { _, err := h.manufactureTPM(v); return err }
	case TPMCopy:
		fn = func() error {
			from := filepath.Join(dir, received)
			if err := h.copyTPM(from, v.TPMDir()); err != nil {
				return err
			}
			return os.RemoveAll(from)
		}
	}
	os.MkdirAll(filepath.Join(dir, LogDir), 0o700)
	return &Created{VM: v}, h.finish(v, fn)
}

// checkTPMOpens opens the TPM in dir with this host's keys and reads its
// state through (both slots verified).
func (h *Registry) checkTPMOpens(dir string) error {
	k, err := h.keys()
	if err != nil {
		return err
	}
	defer k.Close()
	st, err := state.OpenSealed(k, dir, h.log())
	if err != nil {
		return err
	}
	defer st.Close()
	return st.Check()
}

// CheckArrival refuses a VM that cannot arrive here: its name or UUID is
// registered already, or its bundle directory is taken.
func (h *Registry) CheckArrival(c *Config) error {
	if e, err := h.Find(c.Name); err == nil {
		return fmt.Errorf("a VM named %s is %w on this host (%s); pick another name", c.Name, ErrConflict, e.Path)
	} else if !errors.Is(err, ErrNotFound) {
		return err
	}
	if e, err := h.Find(c.UUID.String()); err == nil {
		return fmt.Errorf("a VM with UUID %s is %w on this host: %s at %s", c.UUID, ErrConflict, e.Name, e.Path)
	}
	dir := filepath.Join(h.VMsDir(), c.Name)
	if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
		return errdefs.New(errdefs.ErrAlreadyExists, "%s already exists on this host and is not empty", dir)
	}
	return nil
}

// MarshalConfig is c as WriteConfig writes it.
func MarshalConfig(c *Config) ([]byte, error) {
	cc := *c
	cc.Format = configFormat
	b, err := json.MarshalIndent(&cc, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// Backup is a TPM state kept under the data root's backups: of a deleted
// VM, a removed TPM, or a VM that moved to another host.
type Backup struct {
	Dir  string    `json:"dir"`
	VM   string    `json:"vm"`
	UUID uuid.UUID `json:"uuid"`
}

// Backups lists the kept TPM states of the VM ref names (its name or
// UUID), found by the vm.json kept beside each.
func (h *Registry) Backups(ref string) ([]Backup, error) {
	entries, err := os.ReadDir(h.BackupsDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Backup
	for _, e := range entries {
		dir := filepath.Join(h.BackupsDir(), e.Name())
		b, err := os.ReadFile(filepath.Join(dir, ConfigFile))
		if !e.IsDir() || err != nil {
			continue
		}
		var c struct {
			Name string    `json:"name"`
			UUID uuid.UUID `json:"uuid"`
		}
		if json.Unmarshal(b, &c) != nil {
			continue
		}
		if c.Name == ref || c.UUID.String() == strings.ToLower(ref) {
			out = append(out, Backup{Dir: dir, VM: c.Name, UUID: c.UUID})
		}
	}
	return out, nil
}

// PurgeBackups removes the kept TPM states of the VM ref names, for good,
// and returns what it removed.
func (h *Registry) PurgeBackups(ref string) ([]Backup, error) {
	bs, err := h.Backups(ref)
	if err != nil {
		return nil, err
	}
	for i, b := range bs {
		if err := os.RemoveAll(b.Dir); err != nil {
			return bs[:i], err
		}
	}
	return bs, nil
}
