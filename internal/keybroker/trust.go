package keybroker

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
)

// kindTrusted records the guardians this host was told to trust as owners
// of key protectors without holding them (name: fingerprint; data: the
// guardian's public certificates, PEM).
const kindTrusted = "trusted"

// Trust makes this host accept key protectors owned by g, a guardian given
// by its public certificates. It reports false when g was trusted already.
// A guardian this host holds needs no trust: that is an error matching
// errdefs.ErrAlreadyExists.
//
// A protector's signature proves only that its owner wrote it. Whoever can
// write a bundle can sign a protector of their own for a TPM whose data key
// they know, grant this host, and have it start on that TPM. So a protector
// that a guardian of this host opens is accepted only when its owner is a
// guardian this host holds, or one it trusts.
//
// A key imported for the TPM (ImportKey) opens it whoever the owner is: it
// opens only a protector whose key check matches that very key, that is
// state made by someone who held it, and importing it was the user's
// explicit acceptance of that TPM. It is the recovery path when the owner's
// host is gone.
func (h *Broker) Trust(g *guardian.Guardian) (bool, error) {
	if _, err := h.ks.Get(kindGuardian, g.Fingerprint()); err == nil {
		return false, errdefs.New(errdefs.ErrAlreadyExists, "guardian %s (%s) is held by this host: the key protectors it owns open here already", g.Name(), g.Fingerprint())
	}
	if _, err := h.ks.Get(kindTrusted, g.Fingerprint()); err == nil {
		return false, nil
	}
	certs, err := g.Public().ExportCertificates()
	if err != nil {
		return false, err
	}
	if err := h.ks.Put(kindTrusted, g.Fingerprint(), certs); err != nil {
		return false, fmt.Errorf("trust guardian %s: %w", g.Name(), err)
	}
	h.log.Info("trusting key protectors owned by a guardian", "name", g.Name(), "fingerprint", g.Fingerprint())
	return true, nil
}

// Trusted returns the guardians this host trusts without holding them,
// sorted by fingerprint.
func (h *Broker) Trusted() ([]*guardian.Guardian, error) {
	fps, err := h.ks.List(kindTrusted)
	if err != nil {
		return nil, err
	}
	var gs []*guardian.Guardian
	for _, fp := range fps {
		b, err := h.ks.Get(kindTrusted, fp)
		if err != nil {
			return nil, err
		}
		g, err := guardian.ParseCertificates(b)
		if err != nil || g.Fingerprint() != fp {
			return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "trusted guardian %s in the keystore is damaged", fp)
		}
		gs = append(gs, g)
	}
	return gs, nil
}

// Untrust stops this host from trusting the guardian whose name or
// fingerprint (or a prefix of at least 8 hex digits of it) is ref, and
// returns it. TPMs it owns no longer open here, unless this host holds it.
func (h *Broker) Untrust(ref string) (*guardian.Guardian, error) {
	gs, err := h.Trusted()
	if err != nil {
		return nil, err
	}
	var found []*guardian.Guardian
	for _, g := range gs {
		if g.Name() == ref || g.Fingerprint() == strings.ToLower(ref) || (len(ref) >= 8 && strings.HasPrefix(g.Fingerprint(), strings.ToLower(ref))) {
			found = append(found, g)
		}
	}
	switch len(found) {
	case 0:
		return nil, errdefs.New(errdefs.ErrNotFound, "this host trusts no guardian %q", ref).
			With(errdefs.Do(errdefs.ActionGuardianList).WithNote("the trusted ones are listed as trusted only"))
	case 1:
	default:
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "%q names %d trusted guardians; give a fingerprint instead", ref, len(found)).
			With(errdefs.Do(errdefs.ActionGuardianList))
	}
	g := found[0]
	if err := h.ks.Delete(kindTrusted, g.Fingerprint()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	return g, nil
}

// ownerTrusted reports whether protectors owned by the guardian with
// fingerprint fp are accepted here: held (among held) or trusted.
func (h *Broker) ownerTrusted(fp string, held []*guardian.Guardian) (bool, error) {
	for _, g := range held {
		if g.Fingerprint() == fp {
			return true, nil
		}
	}
	_, err := h.ks.Get(kindTrusted, fp)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// UntrustedOwnerError refuses a TPM whose key protector a guardian of this
// host opens, but whose owner this host neither holds nor trusts: the
// protector may have been put into the bundle by anyone who could write it.
type UntrustedOwnerError struct {
	Dir              string
	TPM              uuid.UUID
	Owner            string // the owner guardian's name
	OwnerFingerprint string
}

func (e *UntrustedOwnerError) Error() string {
	return fmt.Sprintf("TPM %s (%s) is refused: its key protector is owned by guardian %s (fingerprint %s), which this host neither holds nor trusts; "+
		"whoever could write the TPM's files could have put that protector there, so nothing was opened",
		e.TPM, e.Dir, e.Owner, e.OwnerFingerprint)
}

// Is makes the error match errdefs.ErrPermissionDenied.
func (e *UntrustedOwnerError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

// Remedies: get the owner's certificates from its host, check the
// fingerprint, and trust them.
func (e *UntrustedOwnerError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Do(errdefs.ActionGuardianExportCerts, "file", "owner.pem").
			WithNote("if the TPM is genuinely %s's, export its certificates", e.Owner).
			On("on the host holding guardian " + e.Owner),
		errdefs.Do(errdefs.ActionGuardianTrust, "certs", "owner.pem").
			WithNote("then trust them here after checking the fingerprint is %s", e.OwnerFingerprint),
	}
}
