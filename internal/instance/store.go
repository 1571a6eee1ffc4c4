package instance

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"

	"github.com/google/uuid"

	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/libtpms"
	"vtpm/internal/paths"
	"vtpm/internal/seal"
	"vtpm/internal/swtpm"
	"vtpm/internal/swtpm/statefile"
)

// store is where libtpms' blobs live: vtpm's sealed format or swtpm's files.
type store interface {
	libtpms.Storage
	Close() error
}

// Format names a state format.
type Format string

const (
	FormatSealed Format = "sealed"
	FormatSwtpm  Format = "swtpm"
)

// chooseFormat keeps existing sealed state sealed (even when --key is given,
// as libvirt keeps passing it after `vtpm state import`), keeps an existing
// swtpm state in swtpm's format (so a libvirt VM keeps its TPM), uses swtpm's
// format too when --key asks for its encryption, and otherwise seals.
func chooseFormat(cfg *swtpm.Config) Format {
	switch {
	case cfg.StateFile != "":
		return FormatSwtpm // swtpm's linear file backend; sealed state needs a directory
	case cfg.StateDir != "" && seal.Exists(cfg.StateDir):
		return FormatSealed
	case cfg.Key != "" || (cfg.StateDir != "" && statefile.HasState(cfg.StateDir)):
		return FormatSwtpm
	}
	return FormatSealed
}

// sealingKey is what opens sealed state: the data key and where this host
// records generations.
type sealingKey struct {
	dek    []byte
	tpm    uuid.UUID // the TPM's UUID when known (from its key protector)
	gens   seal.Generations
	host   *keybroker.Broker // keeps the keystore open for generation records; nil once pinned
	pinned *keystore.Pinned  // this TPM's generation record, kept open across --runas
}

func (k *sealingKey) close() {
	if k == nil {
		return
	}
	clear(k.dek)
	if k.host != nil {
		k.host.Close()
	}
	if k.pinned != nil {
		k.pinned.Close()
	}
}

// pinGenerations opens this TPM's generation record while the process can
// still reach the root-only keystore, so that it keeps recording (and
// rollback keeps being detected) after --runas drops privileges. The
// keystore is closed: the unprivileged process keeps only that record's
// file descriptor and key.
func (k *sealingKey) pinGenerations(stateDir string) error {
	id := k.tpm
	if id == uuid.Nil { // --data-key: no protector was read
		var err error
		if id, err = seal.Identify(stateDir); err != nil {
			return err
		}
	}
	p, err := k.host.Keystore().Generations().Pin(id)
	if err != nil {
		return fmt.Errorf("--runas: open the generation record of TPM %s before dropping privileges (it detects rollback of the TPM's state): %w", id, err)
	}
	k.pinned, k.gens = p, p
	k.host.Close()
	k.host = nil
	return nil
}

// unlockSealed opens this host's keystore and the TPM's data key: from
// --data-key when given, else from the TPM's key protector. A new state
// directory gets a fresh key and a protector owned by this host's guardian.
func unlockSealed(cfg *swtpm.Config, log *slog.Logger) (*sealingKey, error) {
	host, err := keybroker.Open(paths.DataRoot(), keystore.Options{HostTPM: os.Getenv("VTPM_HOST_TPM"), Logger: log})
	if err != nil {
		return nil, err
	}
	k := &sealingKey{host: host, gens: host.Generations()}
	if cfg.DataKey != "" {
		k.dek, err = keybroker.ParseDataKey(cfg.DataKey)
	} else {
		var o *keybroker.Opened
		if o, err = host.OpenTPMWith(cfg.StateDir, keybroker.OpenOptions{AllowRollback: cfg.AllowRollback}); err == nil {
			k.dek, k.tpm = o.DEK, o.TPM
			if o.Backup != "" {
				fmt.Fprintf(os.Stderr, "vtpm: WARNING: the key of the TPM in %s is gone; as its policy says, a FRESH TPM was provisioned. The old state is kept in %s.\n", cfg.StateDir, o.Backup)
			}
			log.Info("opened the TPM's data key", "tpm", o.TPM, "by", o.By, "new", o.Created)
		}
	}
	if err != nil {
		host.Close()
		return nil, err
	}
	return k, nil
}

// openStore opens the state directory in its format and proves, before any
// client is served, that the existing state can be read. key is nil for swtpm's format.
func openStore(cfg *swtpm.Config, format Format, fileKey *statefile.Key, key *sealingKey, log *slog.Logger) (store, error) {
	if format == FormatSwtpm {
		var st statefile.Storage
		var err error
		if cfg.StateFile != "" {
			st, err = statefile.OpenLinear(cfg.StateFile, fileKey, cfg.StateMode)
		} else {
			if err := os.MkdirAll(cfg.StateDir, 0o750); err != nil {
				return nil, fmt.Errorf("create state directory: %w", err)
			}
			st, err = statefile.OpenDir(cfg.StateDir, fileKey, cfg.StateMode)
		}
		if err != nil {
			return nil, err
		}
		if err := st.Init(); err != nil {
			st.Close()
			return nil, err
		}
		return st, nil
	}
	if cfg.Key != "" {
		log.Warn("the state directory holds vtpm sealed state: --key does not apply to it; it is sealed with the data key", "state", cfg.StateDir)
	}
	mode := os.FileMode(0o600)
	if cfg.StateModeSet {
		mode = cfg.StateMode
	}
	s, err := seal.Open(cfg.StateDir, seal.Options{
		Key:           key.dek,
		Generations:   key.gens, // with --runas, the record pinned before dropping privileges
		AllowRollback: cfg.AllowRollback,
		FileMode:      mode,
		Logger:        log,
	})
	if err != nil {
		return nil, err
	}
	for _, name := range []string{"permall", "volatilestate"} {
		if _, err := s.Load(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.Close()
			return nil, fmt.Errorf("TPM state in %s cannot be opened; nothing was changed: %w", cfg.StateDir, err)
		}
	}
	return s, nil
}
