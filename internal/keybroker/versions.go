package keybroker

import (
	"fmt"
	"path/filepath"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/seal"
)

// OpenOptions change how OpenTPMWith opens a TPM's key.
type OpenOptions struct {
	// AllowRollback accepts a key protector older than the newest version
	// this host has seen, as seal.Options.AllowRollback accepts older state.
	AllowRollback bool
	// Releasable, when set, says whether one of a protector's rows is a
	// guardian that a key service may open for this host (the fleet
	// guardian's). A TPM that no guardian here opens is then reported as a
	// MissingKeyError, for the caller to ask for its key, and never
	// reprovisioned by its on-missing-key policy: its key is not lost.
	Releasable func(rows []guardian.Row) bool
}

// ProtectorRollbackError refuses a key protector older than one this host
// has seen for the TPM: a copy saved before a revocation, put back.
type ProtectorRollbackError struct {
	Dir     string
	TPM     uuid.UUID
	Version uint64 // of protector.json
	Seen    uint64 // the newest version this host has seen
}

func (e *ProtectorRollbackError) Error() string {
	return fmt.Sprintf("%s of TPM %s is version %d, but version %d was seen last: it is an older copy (rollback), "+
		"which may still admit a guardian since revoked; nothing was opened", protectorPath(e.Dir), e.TPM, e.Version, e.Seen)
}

// Is makes the error match errdefs.ErrDataLoss, as rolled-back state does.
func (e *ProtectorRollbackError) Is(target error) bool { return target == errdefs.ErrDataLoss }

// Remedies: the newest protector, or an older one deliberately.
func (e *ProtectorRollbackError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Advise("restore the TPM's newest %s (version %d or later)", ProtectorFile, e.Seen),
		errdefs.Advise("or pass --allow-rollback to the vTPM to accept the older protector deliberately"),
	}
}

// StaleKeyError refuses a TPM whose key protector opens, but whose data key
// does not open its sealed state: the protector is older than the state (a
// copy saved before the TPM was re-keyed, when a guardian was revoked), or
// the state is damaged.
type StaleKeyError struct {
	Dir     string
	TPM     uuid.UUID
	Version uint64 // of protector.json
	By      string // what opened the key: a guardian, or "imported key"
	Err     error  // why no copy of the state verifies
}

func (e *StaleKeyError) Error() string {
	return fmt.Sprintf("the data key that %s opened from %s (protector version %d) does not open the sealed state of TPM %s: "+
		"the protector is older than the state (the TPM was re-keyed since, when a guardian was revoked), or the state is damaged; nothing was opened: %v",
		e.By, protectorPath(e.Dir), e.Version, e.TPM, e.Err)
}

// Unwrap returns the kind and the cause.
func (e *StaleKeyError) Unwrap() []error { return []error{errdefs.ErrDataLoss, e.Err} }

// Remedies: the newest protector, or the state from a backup.
func (e *StaleKeyError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Advise("restore the TPM's newest %s from the host that owns it", ProtectorFile),
		errdefs.Advise("or, if the state is damaged, restore the state directory from a backup"),
	}
}

// checkOpened applies to a key opened from p what this host knows about
// the TPM: an older protector than seen is refused, and the key must open
// the state. Then the protector's version is recorded as seen.
func (h *Broker) checkOpened(dir string, p *guardian.Protector, dek []byte, by string, opts OpenOptions) error {
	gens := h.ks.Generations()
	seen, err := gens.ProtectorVersion(p.TPM())
	if err != nil {
		return err
	}
	if p.Version() < seen {
		if !opts.AllowRollback {
			return &ProtectorRollbackError{Dir: dir, TPM: p.TPM(), Version: p.Version(), Seen: seen}
		}
		h.log.Warn("opening an older key protector (--allow-rollback)", "tpm", p.TPM(), "version", p.Version(), "last_seen", seen)
	}
	if err := seal.CheckKey(dir, dek); err != nil {
		return &StaleKeyError{Dir: dir, TPM: p.TPM(), Version: p.Version(), By: by, Err: err}
	}
	if p.Version() > seen {
		if err := gens.RecordProtectorVersion(p.TPM(), p.Version()); err != nil {
			return fmt.Errorf("record the key protector version of TPM %s: %w", p.TPM(), err)
		}
	}
	return nil
}

func protectorPath(dir string) string { return filepath.Join(dir, ProtectorFile) }

// opened accepts dek, which guardian by (held here, among held) opened from
// p, if this host holds or trusts p's owner; otherwise a key imported for
// the TPM that p holds opens it instead, or the TPM is refused.
func (h *Broker) opened(dir string, p *guardian.Protector, dek []byte, by string, held []*guardian.Guardian, opts OpenOptions) (*Opened, error) {
	ok, err := h.ownerTrusted(p.Owner().Fingerprint(), held)
	if err != nil {
		clear(dek)
		return nil, err
	}
	if !ok {
		clear(dek)
		if imported, have := h.importedKey(p.TPM()); have {
			if p.Holds(imported) {
				return h.openedImported(dir, p, imported, opts)
			}
			clear(imported)
		}
		return nil, &UntrustedOwnerError{Dir: dir, TPM: p.TPM(), Owner: p.Owner().Name(), OwnerFingerprint: p.Owner().Fingerprint()}
	}
	if err := h.checkOpened(dir, p, dek, by, opts); err != nil {
		clear(dek)
		return nil, err
	}
	return opened(p.TPM(), dek, by)
}

// openedImported accepts an imported key that p holds, whoever owns p.
func (h *Broker) openedImported(dir string, p *guardian.Protector, dek []byte, opts OpenOptions) (*Opened, error) {
	const by = "imported key"
	if err := h.checkOpened(dir, p, dek, by, opts); err != nil {
		clear(dek)
		return nil, err
	}
	return opened(p.TPM(), dek, by)
}
