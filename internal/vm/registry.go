package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/google/uuid"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
)

// Registry is the VMs of one data root: bundles created under <root>/vms and
// bundles registered from elsewhere, all listed in <root>/vms.json.
type Registry struct {
	Root string
	// Keys opens this host's keystore (for TPM keys and the local CA).
	Keys func() (*keybroker.Broker, error)
	// Exe is the vtpm executable that runs vTPM instances; default the
	// running executable.
	Exe string
	// Log receives warnings; default slog.Default().
	Log *slog.Logger
	// HostSocket is the key socket of the host service serving this data
	// root, handed to vTPM instances ($VTPM_HOST_SOCKET). A live
	// migration's destination vTPM drops privileges like any other and
	// adopts the arriving TPM through it; without one (no host service,
	// a registry driven in process) that vTPM keeps root's user.
	HostSocket string
}

// NewRegistry returns the VMs under dataRoot; keys opens its keystore.
func NewRegistry(dataRoot string, keys func() (*keybroker.Broker, error)) *Registry {
	return &Registry{Root: dataRoot, Keys: keys}
}

func (h *Registry) log() *slog.Logger {
	if h.Log != nil {
		return h.Log
	}
	return slog.Default()
}

// VMsDir is where new bundles go unless a path is given.
func (h *Registry) VMsDir() string { return filepath.Join(h.Root, "vms") }

// BackupsDir is where the TPM state of removed TPMs and deleted VMs is kept.
func (h *Registry) BackupsDir() string { return filepath.Join(h.Root, "backups") }

func (h *Registry) registryPath() string { return filepath.Join(h.Root, "vms.json") }

// Entry is one registered bundle.
type Entry struct {
	Name string    `json:"name"`
	UUID uuid.UUID `json:"uuid"`
	Path string    `json:"path"`
}

type registry struct {
	Format int     `json:"format"`
	VMs    []Entry `json:"vms"`
}

// Entries returns the registered bundles, sorted by name.
func (h *Registry) Entries() ([]Entry, error) {
	r, err := h.read()
	if err != nil {
		return nil, err
	}
	return r.VMs, nil
}

func (h *Registry) read() (*registry, error) {
	r := &registry{Format: 1}
	b, err := os.ReadFile(h.registryPath())
	if errors.Is(err, fs.ErrNotExist) {
		return r, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "%s is damaged", h.registryPath()).
			With(errdefs.Advise("restore it"), do(errdefs.ActionVMRegister).WithNote("or re-register the bundles"))
	}
	return r, nil
}

// update runs f on the registry under an exclusive lock and writes it back
// when f succeeds.
func (h *Registry) update(f func(r *registry) error) error {
	if err := os.MkdirAll(h.Root, 0o700); err != nil {
		return fmt.Errorf("create data root: %w", err)
	}
	lf, err := os.OpenFile(filepath.Join(h.Root, "vms.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer lf.Close()
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("lock the VM registry: %w", err)
	}
	r, err := h.read()
	if err != nil {
		return err
	}
	if err := f(r); err != nil {
		return err
	}
	slices.SortFunc(r.VMs, func(a, b Entry) int { return strings.Compare(a.Name, b.Name) })
	b, _ := json.MarshalIndent(r, "", "  ")
	return atomicfile.Write(h.registryPath(), append(b, '\n'), 0o600)
}

// Find returns the registered bundle whose name or UUID is ref.
func (h *Registry) Find(ref string) (Entry, error) {
	r, err := h.read()
	if err != nil {
		return Entry{}, err
	}
	for _, e := range r.VMs {
		if e.Name == ref || e.UUID.String() == strings.ToLower(ref) {
			return e, nil
		}
	}
	return Entry{}, &NotFoundError{Ref: ref, Root: h.Root}
}

// VM is an opened bundle.
type VM struct {
	Dir    string
	Config *Config
	host   *Registry
}

// Open finds and reads a registered VM.
func (h *Registry) Open(ref string) (*VM, error) {
	e, err := h.Find(ref)
	if err != nil {
		return nil, err
	}
	return h.openEntry(e)
}

// readConfig reads and validates the vm.json of the bundle in dir against
// this host's configuration.
func (h *Registry) readConfig(dir string) (*Config, error) {
	hc, err := h.HostConfig()
	if err != nil {
		return nil, err
	}
	return ReadConfig(dir, hc)
}

func (h *Registry) openEntry(e Entry) (*VM, error) {
	c, err := h.readConfig(e.Path)
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", e.Name, err)
	}
	if c.UUID != e.UUID {
		return nil, errdefs.New(errdefs.ErrConflict, "VM %s: the bundle at %s now holds VM %s (%s), not the registered %s; unregister it and register the bundle again",
			e.Name, e.Path, c.Name, c.UUID, e.UUID).
			With(do(errdefs.ActionVMUnregister, "vm", e.Name), do(errdefs.ActionVMRegister, "path", e.Path))
	}
	return &VM{Dir: e.Path, Config: c, host: h}, nil
}

// Save writes the VM's vm.json.
func (v *VM) Save() error { return WriteConfig(v.Dir, v.Config) }

// Name is the VM's name.
func (v *VM) Name() string { return v.Config.Name }

// File is the host path of a file vm.json names: relative paths are in
// the bundle. "" stays "".
func (v *VM) File(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(v.Dir, p)
}

// TPMDir is the VM's TPM state directory.
func (v *VM) TPMDir() string { return filepath.Join(v.Dir, TPMDir) }

// Register adds the bundle at path to this host, under name when it is not
// empty (the bundle's vm.json is renamed to match).
func (h *Registry) Register(path, name string) (*VM, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	c, err := h.readConfig(abs)
	if err != nil {
		return nil, err
	}
	if name != "" && name != c.Name {
		if err := validName(name); err != nil {
			return nil, err
		}
		c.Name = name
	}
	err = h.update(func(r *registry) error {
		return r.add(Entry{Name: c.Name, UUID: c.UUID, Path: abs})
	})
	if err != nil {
		return nil, err
	}
	v := &VM{Dir: abs, Config: c, host: h}
	if name != "" {
		if err := v.Save(); err != nil {
			return nil, err
		}
	}
	return v, nil
}

func (r *registry) add(e Entry) error {
	for _, o := range r.VMs {
		switch {
		case o.UUID == e.UUID && o.Path == e.Path:
			return fmt.Errorf("%s is %w as VM %s", e.Path, ErrConflict, o.Name)
		case o.UUID == e.UUID:
			return withFix(fmt.Errorf("a VM with UUID %s is %w on this host: %s at %s. A copied bundle keeps its UUID; "+
				"make a copy with its own identity, or unregister the other one first",
				e.UUID, ErrConflict, o.Name, o.Path),
				do(errdefs.ActionVMClone, "vm", o.Name).WithNote("a copy with its own identity"),
				do(errdefs.ActionVMUnregister, "vm", o.Name))
		case o.Name == e.Name:
			return fmt.Errorf("the name %s is %w on this host (%s at %s); give another with --name", e.Name, ErrConflict, o.UUID, o.Path)
		}
	}
	r.VMs = append(r.VMs, e)
	return nil
}

// Unregister removes a VM from this host's registry; its files stay. A
// running VM is refused: nothing could stop it afterwards.
func (h *Registry) Unregister(ref string) (Entry, error) {
	if v, err := h.Open(ref); err == nil && h.State(v).Running() {
		return Entry{}, precondition([]errdefs.Remedy{do(errdefs.ActionVMStop, "vm", v.Name())}, "VM %s is running; stop it first", v.Name())
	}
	var gone Entry
	err := h.update(func(r *registry) error {
		for i, e := range r.VMs {
			if e.Name == ref || e.UUID.String() == strings.ToLower(ref) {
				gone = e
				r.VMs = slices.Delete(r.VMs, i, i+1)
				return nil
			}
		}
		return &NotFoundError{Ref: ref}
	})
	return gone, err
}
