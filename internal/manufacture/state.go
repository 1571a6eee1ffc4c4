package manufacture

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/uuid"

	"vtpm/internal/keybroker"
	"vtpm/internal/libtpms"
	"vtpm/internal/seal"
	"vtpm/internal/swtpm/statefile"
)

// Format names a state format.
type Format string

// State formats: vtpm's sealed state, or swtpm 0.7.1's files (optionally
// encrypted with an swtpm --key), as `vtpm swtpm socket` chooses them.
const (
	Sealed Format = "sealed"
	Swtpm  Format = "swtpm"
)

// ChooseFormat picks the format the way `vtpm swtpm socket` will when it
// serves dir: existing sealed state stays sealed, existing swtpm state or a
// swtpm key means swtpm's format, anything else is sealed.
func ChooseFormat(dir string, swtpmKey bool) Format {
	switch {
	case seal.Exists(dir):
		return Sealed
	case swtpmKey || statefile.HasState(dir):
		return Swtpm
	}
	return Sealed
}

// HasState reports whether dir holds TPM state in either format.
func HasState(dir string) bool { return seal.HasBlobs(dir) || statefile.HasState(dir) }

// RemoveState deletes the TPM state in dir, in both formats, with the sealed
// state's identity and key protector, so that the next manufacture makes a
// new TPM (new UUID, new key). The directory and its other files stay. It
// holds the directory's lock while it removes, so the state of a running
// TPM is left whole (the error wraps seal.ErrLocked).
func RemoveState(dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	unlock, err := seal.Lock(dir)
	if err != nil {
		return fmt.Errorf("remove the TPM state in %s: %w; nothing was changed", dir, err)
	}
	defer unlock()
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read state directory: %w", err)
	}
	for _, e := range entries {
		if n := e.Name(); e.Type().IsRegular() && isStateFile(n) {
			if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("remove old TPM state %s: %w", n, err)
			}
		}
	}
	return nil
}

// isStateFile reports whether a file name is TPM state: a sealed blob in any
// of its copies (<blob>[.<copy>].sealed[.…]), an swtpm state file, or the
// sealed state's identity and key protector.
func isStateFile(name string) bool {
	if name == seal.StateFileName || name == keybroker.ProtectorFile {
		return true
	}
	for _, n := range seal.Names {
		if name == "tpm2-00."+n || (strings.HasPrefix(name, n+".") && strings.Contains(name, ".sealed")) {
			return true
		}
	}
	return false
}

// Storage is a state directory opened for libtpms.
type Storage interface {
	libtpms.Storage
	Close() error
}

// Opened is a state directory ready for manufacture.
type Opened struct {
	Storage Storage
	TPM     uuid.UUID // sealed state's UUID; a fresh random one for swtpm files
	Format  Format
	// Store is the sealed store (nil for swtpm files).
	Store *seal.Store
}

// OpenSealed opens (creating) sealed state in dir, with the data key from
// host's key protector for dir (a new dir gets a fresh key and protector).
func OpenSealed(host *keybroker.Broker, dir string, log *slog.Logger) (*Opened, error) {
	o, err := host.OpenTPM(dir)
	if err != nil {
		return nil, err
	}
	defer o.Close()
	s, err := o.Key.OpenStore(dir, seal.Options{Generations: host.Generations(), Logger: log})
	if err != nil {
		return nil, err
	}
	return &Opened{Storage: s, TPM: s.UUID(), Format: Sealed, Store: s}, nil
}

// OpenSwtpm opens dir in swtpm 0.7.1's file format, encrypted with key when
// it is non-nil.
func OpenSwtpm(dir string, key *statefile.Key, mode os.FileMode) (*Opened, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	d, err := statefile.OpenDir(dir, key, mode)
	if err != nil {
		return nil, err
	}
	if err := d.Init(); err != nil {
		d.Close()
		return nil, err
	}
	return &Opened{Storage: d, TPM: uuid.New(), Format: Swtpm}, nil
}

// Manufacture starts libtpms on st (a fresh TPM when st holds no state),
// provisions it as o says, allocates the PCR banks, and shuts it down
// orderly so the state is complete on disk. The process must not have
// another libtpms TPM open.
func Manufacture(st libtpms.Storage, o Options) (rep *Report, err error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	tpm, err := libtpms.Open(st)
	if err != nil {
		return nil, err
	}
	defer tpm.Close()
	if err := start(tpm); err != nil {
		return nil, err
	}
	rep, err = Provision(tpm, o)
	if err != nil {
		return nil, err
	}
	if rep.Available, rep.PCRBanks, err = Banks(tpm); err != nil {
		return nil, err
	}
	if o.PCRBanks != nil && !sameBanks(rep.PCRBanks, o.PCRBanks) {
		if _, err := AllocatePCRs(tpm, o.PCRBanks); err != nil {
			return nil, err
		}
		// The allocation takes effect at the next TPM reset.
		if err := shutdown(tpm); err != nil {
			return nil, err
		}
		tpm.Terminate()
		if err := start(tpm); err != nil {
			return nil, err
		}
		if _, rep.PCRBanks, err = Banks(tpm); err != nil {
			return nil, err
		}
		if !sameBanks(rep.PCRBanks, o.PCRBanks) {
			return nil, fmt.Errorf("PCR banks after TPM2_PCR_Allocate and a reset are %s, want %s", strings.Join(rep.PCRBanks, ","), strings.Join(o.PCRBanks, ","))
		}
	}
	if err := shutdown(tpm); err != nil {
		return nil, err
	}
	tpm.Terminate()
	return rep, nil
}

func sameBanks(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

func start(tpm *libtpms.TPM) error {
	if err := tpm.Init(); err != nil {
		return fmt.Errorf("start libtpms: %w", err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		return fmt.Errorf("TPM2_Startup(CLEAR): %w", err)
	}
	return nil
}

func shutdown(tpm *libtpms.TPM) error {
	if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		return fmt.Errorf("TPM2_Shutdown(CLEAR): %w", err)
	}
	return nil
}
