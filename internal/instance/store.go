package instance

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/google/uuid"

	"vtpm/internal/guardian"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/paths"
	"vtpm/internal/seal"
	"vtpm/internal/state"
	"vtpm/internal/swtpm"
	"vtpm/internal/swtpm/statefile"
)

// sealingKey is what opens sealed state: the TPM's data key (in the key
// broker's locked memory) and the TPM's generation record. The instance
// holds nothing else of the host keystore: the record is pinned (its file
// and its own key kept) and the keystore closed, but for a TPM just
// provisioned, which keeps it until the TPM is initialised (adopter).
type sealingKey struct {
	key    *keybroker.Key
	tpm    uuid.UUID
	pinned *keystore.Pinned // this TPM's generation record
	// adopter is the host's key broker, kept open (and only read) while a
	// TPM just provisioned in an empty directory may still be replaced by
	// one arriving in a migration stream (see adopt.go); nil otherwise.
	adopter *keybroker.Broker
	// service is the same for a process that cannot read the keystore
	// once it runs as its user: a connection to the host service, made
	// while sockets may still be made, on which it asks for the adoption.
	service *hostsvc.Reservation
}

func (k *sealingKey) close() {
	if k == nil {
		return
	}
	k.key.Close()
	if k.pinned != nil {
		k.pinned.Close()
	}
	k.dropAdopter()
}

// dropAdopter closes the key broker kept for an adoption, wiping the
// keystore's keys: once the TPM is in use it stays the one it is.
func (k *sealingKey) dropAdopter() {
	if k == nil {
		return
	}
	if k.adopter != nil {
		k.adopter.Close()
		k.adopter = nil
	}
	if k.service != nil {
		k.service.Close()
		k.service = nil
	}
}

func openBroker(log *slog.Logger) (*keybroker.Broker, error) {
	return keybroker.Open(paths.HostDataRoot(), keystore.Options{HostTPM: os.Getenv("VTPM_HOST_TPM"), Logger: log})
}

// openSealed runs before the sandbox confines the process: it makes what
// the confined process needs from the data root exist (the keystore, this
// host's guardian, a new TPM's identity and key protector, the TPM's
// generation record), so that the process may write nothing of the data
// root but that record, and returns the record's path. It opens the TPM's
// data key and pins the record (its file and key kept open, the keystore
// closed), so the instance keeps recording generations after --runas drops
// privileges. A --data-key is read after confinement, by readDataKey: its
// descriptor can be read once, and a re-executed image repeats everything
// before confinement. A record missing for a TPM that has state means
// rollback protection starts over for it: that is said loudly, and
// remembered for `doctor`. allowRollback (--allow-rollback) accepts an
// older key protector too. With adoptable, a TPM it provisions in an empty
// directory keeps the broker open for an adoption (sealingKey.adopter); a
// process that will run as another user (runAs, --runas) cannot read the
// keystore then, and keeps a connection to the host service for it instead
// (sealingKey.service).
//
// A process that cannot open the keystore (one libvirt starts as tss) asks
// the host service instead, which hands over the key and the record's open
// file: no path of the data root is then needed, and record is empty.
func openSealed(stateDir, dataKey, runAs string, allowRollback, adoptable bool, log *slog.Logger) (_ *sealingKey, record string, err error) {
	host, err := openBroker(log)
	if err != nil {
		if dataKey == "" && hostsvc.UseService(err) {
			k, created, serr := openFromService(stateDir, allowRollback, log)
			if serr != nil {
				return nil, "", hostsvc.Fallback(err, serr)
			}
			if adoptable && created {
				k.service = reserveService(log)
			}
			return k, "", nil
		}
		return nil, "", err
	}
	keep := false
	defer func() {
		if !keep {
			host.Close()
		}
	}()
	// Whether the TPM had a record is looked at before its key is opened,
	// which records the protector's version in it.
	var known uuid.UUID
	hadRecord := false
	if seal.Exists(stateDir) {
		if known, err = seal.Identify(stateDir); err != nil {
			return nil, "", err
		}
		if hadRecord, err = host.HasGenerations(known); err != nil {
			return nil, "", err
		}
	}
	k := &sealingKey{}
	defer func() {
		if err != nil {
			k.close()
		}
	}()
	if dataKey != "" {
		if k.tpm, err = seal.Identify(stateDir); err != nil {
			return nil, "", err
		}
	} else {
		// Opening the key creates a new TPM's identity and key protector,
		// or reprovisions one, and a TPM this host cannot open fails before
		// its generation record is touched.
		o, err := host.OpenTPMWith(stateDir, keybroker.OpenOptions{AllowRollback: allowRollback, Releasable: func(rows []guardian.Row) bool {
			_, ok := hostsvc.FleetRow(paths.HostDataRoot(), rows)
			return ok
		}})
		var missing *keybroker.MissingKeyError
		if errors.As(err, &missing) {
			if row, ok := hostsvc.FleetRow(paths.HostDataRoot(), missing.Rows); ok {
				// The protector has the fleet guardian's row: the host
				// service asks the key service for the key (this process
				// links no network client).
				log.Info("no guardian of this host opens the TPM; asking the host service for its key from the key service", "tpm", missing.TPM, "fleet_guardian", row.Name)
				host.Close()
				keep = true // closed already
				sk, _, serr := openFromService(stateDir, allowRollback, log)
				if serr != nil {
					return nil, "", &hostsvc.FleetError{Missing: missing, Service: serr}
				}
				return sk, "", nil
			}
		}
		if err != nil {
			return nil, "", err
		}
		k.key, k.tpm = o.Key, o.TPM
		adoptable = adoptable && o.Created
		if o.Backup != "" {
			fmt.Fprintf(os.Stderr, "vtpm: WARNING: the key of the TPM in %s is gone; as its policy says, a FRESH TPM was provisioned. The old state is kept in %s.\n", stateDir, o.Backup)
		}
		log.Info("opened the TPM's data key", "tpm", o.TPM, "by", o.By, "new", o.Created)
	}
	reset, err := host.PrepareGenerations(k.tpm, stateDir, hadRecord || k.tpm != known)
	if err != nil {
		return nil, "", fmt.Errorf("open the generation record of TPM %s (it detects rollback of the TPM's state): %w", k.tpm, err)
	}
	if reset {
		fmt.Fprintf(os.Stderr, "vtpm: WARNING: ROLLBACK PROTECTION WAS RESET for TPM %s in %s: this host has no record of the TPM's last state generation "+
			"(the record was deleted, or the TPM comes from another host), so an older copy of its state could not be told from the current one. "+
			"The current state is taken as genuine and recorded from now on.\n", k.tpm, stateDir)
		log.Warn("rollback protection was reset: no generation record for a TPM that has state", "tpm", k.tpm, "state", stateDir)
	}
	if k.pinned, err = host.Keystore().Generations().Pin(k.tpm); err != nil {
		return nil, "", fmt.Errorf("open the generation record of TPM %s (it detects rollback of the TPM's state): %w", k.tpm, err)
	}
	if adoptable && dataKey == "" {
		if runAs == "" {
			k.adopter, keep = host, true
		} else {
			k.service = reserveService(log)
		}
	}
	return k, host.Keystore().GenerationsPath(k.tpm), nil
}

// reserveService connects to the host service for a later adoption, or
// returns nil (said in the log): the TPM serves as it is either way.
func reserveService(log *slog.Logger) *hostsvc.Reservation {
	r, err := hostsvc.Client{}.Reserve()
	if err != nil {
		log.Warn("this vTPM cannot take a TPM from a migration stream: it runs as another user and the host service did not answer", "err", err)
		return nil
	}
	return r
}

// openFromService asks the host service for the TPM's key and generation
// record; created says the TPM is new.
func openFromService(stateDir string, allowRollback bool, log *slog.Logger) (*sealingKey, bool, error) {
	o, err := hostsvc.Client{}.Open(stateDir, keybroker.OpenOptions{AllowRollback: allowRollback})
	if err != nil {
		return nil, false, err
	}
	if o.Backup != "" {
		fmt.Fprintf(os.Stderr, "vtpm: WARNING: the key of the TPM in %s is gone; as its policy says, a FRESH TPM was provisioned. The old state is kept in %s.\n", stateDir, o.Backup)
	}
	if o.Reset {
		fmt.Fprintf(os.Stderr, "vtpm: WARNING: ROLLBACK PROTECTION WAS RESET for TPM %s in %s: this host has no record of the TPM's last state generation; "+
			"the current state is taken as genuine and recorded from now on.\n", o.TPM, stateDir)
	}
	log.Info("opened the TPM's data key through the host service", "tpm", o.TPM, "by", o.By, "new", o.Created, "socket", hostsvc.SocketPath())
	return &sealingKey{key: o.Key, tpm: o.TPM, pinned: o.Record}, o.Created, nil
}

// readDataKey reads --data-key (file= or fd=) into k, in the confined process.
func (k *sealingKey) readDataKey(dataKey string) (err error) {
	k.key, err = keybroker.ParseDataKey(dataKey)
	return err
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
	o, err := state.OpenSealedWith(opts.StateDir, key.key, seal.Options{
		Generations:   key.pinned, // pinned before any privileges were dropped
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
