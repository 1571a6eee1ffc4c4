package keybroker

import (
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keyfile"
	"vtpm/internal/seal"
	"vtpm/internal/state"
)

// Pick returns the held guardian ref names (see [Broker.Find]), or this
// host's own when ref is empty, and whether it is this host's own.
func (h *Broker) Pick(ref string) (g *guardian.Guardian, local bool, err error) {
	own, err := h.Local()
	if err != nil || ref == "" {
		return own, true, err
	}
	if g, err = h.Find(ref); err != nil {
		return nil, false, err
	}
	return g, g.Fingerprint() == own.Fingerprint(), nil
}

// ImportPKCS12 adds the guardian in a PKCS#12 file (name is for messages)
// to this host; see [Broker.Import].
func (h *Broker) ImportPKCS12(name string, data []byte, password string, replace bool) (*guardian.Guardian, error) {
	g, err := guardian.ImportPKCS12(data, password)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", name, err)
	}
	return g, h.Import(g, replace)
}

// Grant admits g, given by its public certificates, to the key protector of
// the TPM in dir. Only a host holding the protector's owner can.
func (h *Broker) Grant(dir string, g *guardian.Guardian) (*guardian.Protector, error) {
	return h.changeProtector(dir, func(p *guardian.Protector, key *Key, owner *guardian.Guardian) error {
		return key.Grant(p, g, owner)
	})
}

// Revoke removes the guardian ref names (its name, fingerprint, or a prefix
// of at least 8 hex digits of it) from the key protector of the TPM in dir.
// Only a host holding the protector's owner can.
func (h *Broker) Revoke(dir, ref string) (*guardian.Protector, error) {
	p, err := ReadProtector(dir)
	if err != nil {
		return nil, err
	}
	var fps []string
	for _, r := range p.Rows() {
		if r.Name == ref || r.Fingerprint == ref || (len(ref) >= 8 && strings.HasPrefix(r.Fingerprint, ref)) {
			fps = append(fps, r.Fingerprint)
		}
	}
	show := errdefs.Do(errdefs.ActionProtectorShow, "tpm", dir).WithNote("list the protector's guardians")
	switch len(fps) {
	case 0:
		return nil, errdefs.New(errdefs.ErrNotFound, "no guardian %q in the protector of %s", ref, dir).With(show)
	case 1:
	default:
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "%q names %d guardians in the protector of %s; give a fingerprint", ref, len(fps), dir).With(show)
	}
	return h.changeProtector(dir, func(p *guardian.Protector, _ *Key, owner *guardian.Guardian) error {
		return p.Revoke(fps[0], owner)
	})
}

// changeProtector opens dir's TPM, checks this host holds the owner's key,
// applies change and writes the protector back.
func (h *Broker) changeProtector(dir string, change func(p *guardian.Protector, key *Key, owner *guardian.Guardian) error) (*guardian.Protector, error) {
	p, err := ReadProtector(dir)
	if err != nil {
		return nil, err
	}
	owner, err := h.Find(p.Owner().Fingerprint())
	if err != nil {
		return nil, errdefs.New(errdefs.ErrPermissionDenied, "only the owner of TPM %s, guardian %s (%s), can change its protector; run this on a host that holds it",
			p.TPM(), p.Owner().Name(), p.Owner().Fingerprint())
	}
	o, err := h.OpenTPM(dir)
	if err != nil {
		return nil, err
	}
	defer o.Close()
	if err := change(p, o.Key, owner); err != nil {
		return nil, err
	}
	if err := WriteProtector(dir, p); err != nil {
		return nil, err
	}
	return p, nil
}

// ExportKey returns the data key of the TPM in dir as a key file encrypted
// under passphrase (Argon2id + AES-GCM), and the TPM's UUID. It never
// provisions a TPM: dir must hold one.
func (h *Broker) ExportKey(dir, passphrase string) (uuid.UUID, []byte, error) {
	if !seal.Exists(dir) {
		return uuid.Nil, nil, errdefs.New(errdefs.ErrNotFound, "%s holds no vtpm TPM state (no %s); nothing was exported", dir, seal.StateFileName)
	}
	o, err := h.OpenTPM(dir)
	if err != nil {
		return uuid.Nil, nil, err
	}
	defer o.Close()
	b, err := o.Key.Export(passphrase, time.Now())
	return o.TPM, b, err
}

// ImportKeyFile decrypts a key file made by [Broker.ExportKey] with
// passphrase and stores its key (see importKey). It returns the TPM the
// key belongs to; a file that does not decrypt is a *KeyFileError.
func (h *Broker) ImportKeyFile(data []byte, passphrase string, replace bool) (uuid.UUID, error) {
	k, err := keyfile.Decrypt(data, passphrase)
	if err != nil {
		return uuid.Nil, &KeyFileError{Err: err}
	}
	defer clear(k.DEK)
	return k.TPM, h.importKey(k.TPM, k.DEK, replace)
}

// KeyFileError is a key file that does not decrypt (wrong passphrase, not a
// key file, damaged).
type KeyFileError struct{ Err error }

func (e *KeyFileError) Error() string { return e.Err.Error() }
func (e *KeyFileError) Unwrap() error { return e.Err }

// KeyFor returns how a TPM whose state is being made in a directory gets
// its data key: the key a --data-key option (see [ParseDataKey]) names when
// opt is set, else its own new key under a protector owned by this host's
// guardian, written into that directory.
func (h *Broker) KeyFor(opt string) func(dir string) (state.SealKey, error) {
	return func(dir string) (state.SealKey, error) {
		if opt != "" {
			return ParseDataKey(opt)
		}
		o, err := h.OpenTPM(dir)
		if err != nil {
			return nil, err
		}
		return o.Key, nil
	}
}
