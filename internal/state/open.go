package state

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"

	"github.com/google/uuid"

	"vtpm/internal/libtpms"
	"vtpm/internal/seal"
	"vtpm/internal/swtpm/statefile"
)

// Storage is TPM state opened for libtpms. Close releases the directory's
// lock.
type Storage interface {
	libtpms.Storage
	Close() error
}

// Opened is TPM state opened for libtpms, in its format.
type Opened struct {
	Storage Storage
	TPM     uuid.UUID // sealed state's UUID; a fresh random one for swtpm files
	Format  Format
	// Store is the sealed store (nil for swtpm files).
	Store *seal.Store
}

// Close closes the storage and releases the lock.
func (o *Opened) Close() error { return o.Storage.Close() }

// SealKey is a TPM's data key as the key broker hands it out
// (*keybroker.Key): it opens the TPM's sealed store and never shows itself.
// Close wipes it.
type SealKey interface {
	// OpenStore is seal.Open with the key set in opts.
	OpenStore(dir string, opts seal.Options) (*seal.Store, error)
	Close()
}

// Keys hands out the data keys of sealed TPMs: the host's key broker
// (*keybroker.Broker).
type Keys interface {
	// OpenKey returns the data key of the TPM whose state is in dir (a new
	// dir gets its identity and a fresh key), and the TPM's UUID. The
	// caller closes the key.
	OpenKey(dir string) (tpm uuid.UUID, key SealKey, err error)
	// Generations is where the host records the newest generation it has
	// seen of each TPM's state.
	Generations() seal.Generations
}

// OpenSealed opens (creating) sealed state in dir with the data key keys
// unwraps from dir's key protector; a new dir gets a fresh key and a
// protector owned by this host's guardian. Generations are recorded where
// keys records them.
func OpenSealed(keys Keys, dir string, log *slog.Logger) (*Opened, error) {
	_, key, err := keys.OpenKey(dir)
	if err != nil {
		return nil, err
	}
	defer key.Close()
	return OpenSealedWith(dir, key, seal.Options{Generations: keys.Generations(), Logger: log})
}

// OpenSealedWith opens (creating) sealed state in dir with a data key
// already in hand: one opened before privileges were dropped, or given with
// --data-key. opts.Key is set by key.
func OpenSealedWith(dir string, key SealKey, opts seal.Options) (*Opened, error) {
	s, err := key.OpenStore(dir, opts)
	if err != nil {
		return nil, err
	}
	return &Opened{Storage: s, TPM: s.UUID(), Format: Sealed, Store: s}, nil
}

// OpenSwtpm opens dir (creating it) in swtpm 0.7.1's file format, encrypted
// with key when it is non-nil, and takes its lock.
func OpenSwtpm(dir string, key *statefile.Key, mode os.FileMode) (*Opened, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	d, err := statefile.OpenDir(dir, key, mode)
	if err != nil {
		return nil, err
	}
	return swtpmOpened(d)
}

// OpenSwtpmFile opens swtpm's linear state file at path (--tpmstate
// backend-uri=file://), encrypted with key when it is non-nil.
func OpenSwtpmFile(path string, key *statefile.Key, mode os.FileMode) (*Opened, error) {
	l, err := statefile.OpenLinear(path, key, mode)
	if err != nil {
		return nil, err
	}
	return swtpmOpened(l)
}

func swtpmOpened(st statefile.Storage) (*Opened, error) {
	if err := st.Init(); err != nil {
		st.Close()
		return nil, err
	}
	return &Opened{Storage: st, TPM: uuid.New(), Format: Swtpm}, nil
}

// StateInfo describes one stored blob as --print-states lists it: its name
// and plaintext size.
type StateInfo struct {
	Name string
	Size int64
}

// States lists the stored blobs.
func (o *Opened) States() ([]StateInfo, error) {
	if o.Store != nil {
		return infos(o.Store.States())
	}
	return infos(o.Storage.(statefile.Storage).States())
}

// infos converts a listing of either format's blobs.
func infos[T interface {
	~struct {
		Name string
		Size int64
	}
}](list []T, err error) ([]StateInfo, error) {
	if err != nil {
		return nil, err
	}
	out := make([]StateInfo, len(list))
	for i, x := range list {
		out[i] = StateInfo(x)
	}
	return out, nil
}

// ListSealed lists the blobs of the sealed state in dir without its key or
// its lock (their sizes are those of the sealed files less the format's
// overhead).
func ListSealed(dir string) ([]StateInfo, error) {
	return infos(seal.ListStates(dir))
}

// Check proves, before any client is served, that the state libtpms loads
// at start-up can be read: for sealed state, that every copy it would load
// verifies under the data key, belongs to this TPM and is not rolled back.
// Nothing is changed. swtpm's files are read as libtpms loads them, as
// swtpm does.
func (o *Opened) Check() error {
	if o.Store == nil {
		return nil
	}
	for _, name := range []string{"permall", "volatilestate"} {
		b, err := o.Store.Load(name)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("TPM state in %s cannot be opened; nothing was changed: %w", o.Store.Dir(), err)
		}
		clear(b)
	}
	return nil
}
