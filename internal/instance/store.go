package instance

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/google/uuid"

	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/paths"
	"vtpm/internal/seal"
	"vtpm/internal/state"
	"vtpm/internal/swtpm"
	"vtpm/internal/swtpm/statefile"
)

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
// allowRollback (--allow-rollback) accepts an older key protector too.
func unlockSealed(stateDir, dataKey string, allowRollback bool, log *slog.Logger) (*sealingKey, error) {
	host, err := keybroker.Open(paths.DataRoot(), keystore.Options{HostTPM: os.Getenv("VTPM_HOST_TPM"), Logger: log})
	if err != nil {
		return nil, err
	}
	k := &sealingKey{host: host, gens: host.Generations()}
	if dataKey != "" {
		k.dek, err = keybroker.ParseDataKey(dataKey)
	} else {
		var o *keybroker.Opened
		if o, err = host.OpenTPMWith(stateDir, keybroker.OpenOptions{AllowRollback: allowRollback}); err == nil {
			k.dek, k.tpm = o.DEK, o.TPM
			if o.Backup != "" {
				fmt.Fprintf(os.Stderr, "vtpm: WARNING: the key of the TPM in %s is gone; as its policy says, a FRESH TPM was provisioned. The old state is kept in %s.\n", stateDir, o.Backup)
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

// openStore opens the state in its format and proves, before any client is
// served, that the existing state can be read. key is nil for swtpm's
// format; allowRollback is --allow-rollback, for sealed state.
func openStore(opts *swtpm.Options, format state.Format, fileKey *statefile.Key, key *sealingKey, allowRollback bool, log *slog.Logger) (*state.Opened, error) {
	if format == state.Swtpm {
		if opts.StateFile != "" {
			return state.OpenSwtpmFile(opts.StateFile, fileKey, opts.StateMode)
		}
		return state.OpenSwtpm(opts.StateDir, fileKey, opts.StateMode)
	}
	if opts.Key != "" {
		log.Warn("the state directory holds vtpm sealed state: --key does not apply to it; it is sealed with the data key", "state", opts.StateDir)
	}
	if state.IsSwtpm(opts.StateDir) {
		// Files copied in by name (as swtpm's own tests do) would
		// otherwise be ignored without a word.
		log.Warn("the state directory also holds swtpm's state files (tpm2-00.permall), which sealed state ignores; import them into sealed state, or serve them in swtpm's format from a directory of their own", "state", opts.StateDir)
	}
	mode := os.FileMode(0o600)
	if opts.StateModeSet {
		mode = opts.StateMode
	}
	o, err := state.OpenSealedWith(opts.StateDir, seal.Options{
		Key:           key.dek,
		Generations:   key.gens, // with --runas, the record pinned before dropping privileges
		AllowRollback: allowRollback,
		FileMode:      mode,
		Logger:        log,
	})
	if err != nil {
		return nil, err
	}
	if err := o.Check(); err != nil {
		o.Close()
		return nil, err
	}
	return o, nil
}
