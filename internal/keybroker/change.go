package keybroker

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/seal"
)

// NotOwnerError refuses a change of a TPM's key protector on a host that
// does not hold the protector's owner: only the owner signs protectors.
type NotOwnerError struct {
	Dir              string
	TPM              uuid.UUID
	Owner            string
	OwnerFingerprint string
}

func (e *NotOwnerError) Error() string {
	return fmt.Sprintf("only the owner of TPM %s, guardian %s (%s), can change its protector; run this on a host that holds it",
		e.TPM, e.Owner, e.OwnerFingerprint)
}

// Is makes the error match errdefs.ErrPermissionDenied.
func (e *NotOwnerError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

// Remedies lists the guardians this host holds.
func (e *NotOwnerError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{errdefs.Do(errdefs.ActionGuardianList).WithNote("the guardians this host holds")}
}

// forChange reads dir's protector and opens its key on this host, which
// must hold the protector's owner.
func (h *Broker) forChange(dir string) (*guardian.Protector, *guardian.Guardian, []byte, error) {
	p, err := ReadProtector(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	owner, err := h.guardian(p.Owner().Fingerprint())
	if err != nil || !owner.HasPrivate() {
		return nil, nil, nil, &NotOwnerError{Dir: dir, TPM: p.TPM(), Owner: p.Owner().Name(), OwnerFingerprint: p.Owner().Fingerprint()}
	}
	o, err := h.OpenTPM(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	if !p.Holds(o.DEK) {
		clear(o.DEK)
		return nil, nil, nil, errdefs.New(errdefs.ErrConflict, "%s changed while it was read; try again", protectorPath(dir))
	}
	return p, owner, o.DEK, nil
}

// Grant admits guardian g (public certificates are enough) to the TPM in
// dir: a row wrapping its data key, the next protector version. The key
// does not change, so Grant works on a running TPM. This host must hold
// the protector's owner.
func (h *Broker) Grant(dir string, g *guardian.Guardian) (*guardian.Protector, error) {
	p, owner, dek, err := h.forChange(dir)
	if err != nil {
		return nil, err
	}
	defer clear(dek)
	if err := p.Grant(dek, g, owner); err != nil {
		return nil, err
	}
	if err := WriteProtector(dir, p); err != nil {
		return nil, err
	}
	if err := h.ks.Generations().RecordProtectorVersion(p.TPM(), p.Version()); err != nil {
		return p, fmt.Errorf("granted, but recording the protector's version failed: %w", err)
	}
	return p, nil
}

// Revoke shuts the guardian with fingerprint fp out of the TPM in dir for
// good: the TPM is re-keyed (a new data key, its state re-sealed under it
// crash-safely, see seal.Rekey) and gets a new protector, without fp's row,
// whose version is recorded here. A copy of the old protector, or the old
// key in whatever form (a key file exported before), no longer opens the
// state; on this host an older protector is refused outright. A key this
// host imported for the TPM is replaced by the new one.
//
// Re-keying needs the TPM stopped: a running TPM is refused with an error
// matching errdefs.ErrFailedPrecondition, and nothing changes. This host
// must hold the protector's owner.
func (h *Broker) Revoke(dir, fp string) (*guardian.Protector, error) {
	p, owner, dek, err := h.forChange(dir)
	if err != nil {
		return nil, err
	}
	defer clear(dek)
	newDEK := make([]byte, guardian.DEKSize)
	rand.Read(newDEK)
	defer clear(newDEK)
	q, err := p.Rekey(newDEK, owner, fp)
	if err != nil {
		return nil, err
	}
	read := p.Marshal()
	commit := func() error {
		// Under the TPM's lock: a grant that wrote the protector since it
		// was read would be lost.
		now, err := ReadProtector(dir)
		if err != nil {
			return err
		}
		if !bytes.Equal(now.Marshal(), read) {
			return errdefs.New(errdefs.ErrConflict, "%s changed while the TPM was re-keyed; nothing was changed, try again", protectorPath(dir))
		}
		return WriteProtector(dir, q)
	}
	err = seal.Rekey(dir, seal.Options{Key: dek, Generations: h.Generations(), Logger: h.log}, newDEK, commit)
	if errors.Is(err, seal.ErrLocked) {
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "TPM %s in %s is running: revoking a guardian re-keys the TPM's state, which needs it stopped; nothing was changed", p.TPM(), dir).
			With(errdefs.Advise("stop the VM (or the vTPM process) using it, then revoke again"))
	}
	if err != nil {
		return nil, err
	}
	h.log.Info("re-keyed TPM: revoked a guardian", "tpm", q.TPM(), "revoked", fp, "protector_version", q.Version())
	var errs []error
	if err := h.ks.Generations().RecordProtectorVersion(q.TPM(), q.Version()); err != nil {
		errs = append(errs, fmt.Errorf("record the protector's version: %w", err))
	}
	if old, ok := h.importedKey(q.TPM()); ok {
		clear(old)
		if err := h.ks.Put(kindTPMKey, q.TPM().String(), newDEK); err != nil {
			errs = append(errs, fmt.Errorf("replace the key imported for the TPM: %w", err))
		}
	}
	if len(errs) > 0 {
		return q, fmt.Errorf("revoked and re-keyed TPM %s, but: %w", q.TPM(), errors.Join(errs...))
	}
	return q, nil
}
