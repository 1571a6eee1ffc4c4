package keybroker

import (
	"bytes"
	"errors"
	"fmt"
	"os"
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

// ExportGuardian encodes the guardian ref names (see [Broker.Pick]): its
// public certificates (PEM) when certsOnly, else a PKCS#12 file, private
// key included, under the password password returns (asked for only then).
// perm is the mode its file should have: a private key is its owner's alone.
func (h *Broker) ExportGuardian(ref string, certsOnly bool, password func() (string, error)) (data []byte, perm os.FileMode, err error) {
	g, _, err := h.Pick(ref)
	if err != nil {
		return nil, 0, err
	}
	if certsOnly {
		data, err = g.ExportCertificates()
		return data, 0o644, err
	}
	pw, err := password()
	if err != nil {
		return nil, 0, err
	}
	data, err = g.ExportPKCS12(pw)
	return data, 0o600, err
}

// ImportPKCS12 adds the guardian in a PKCS#12 file (name is for messages)
// to this host; see [Broker.Import].
func (h *Broker) ImportPKCS12(name string, data []byte, password string, replace bool) (*guardian.Guardian, error) {
	g, err := guardian.ImportPKCS12(data, password)
	if err != nil {
		var pem *guardian.NotPKCS12Error
		if errors.As(err, &pem) {
			pem.File = name // the remedies name the file
		}
		return nil, fmt.Errorf("import %s: %w", name, err)
	}
	return g, h.Import(g, replace)
}

// Grant admits g, given by its public certificates, to the key protector of
// the TPM in dir: a row wrapping its data key, the next protector version
// (recorded here). The key does not change, so Grant works on a running
// TPM. Only a host holding the protector's owner can.
func (h *Broker) Grant(dir string, g *guardian.Guardian) (*guardian.Protector, error) {
	p, owner, key, err := h.forChange(dir)
	if err != nil {
		return nil, err
	}
	defer key.Close()
	if err := key.Grant(p, g, owner); err != nil {
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

// Revoke shuts the guardian ref names (its name, fingerprint, or a prefix
// of at least 8 hex digits of it) out of the TPM in dir for good: the TPM
// is re-keyed (a new data key, its state re-sealed under it crash-safely,
// see seal.Rekey) and gets a new protector, without that guardian's row,
// whose version is recorded here. A copy of the old protector, or the old
// key in whatever form (a key file exported before), no longer opens the
// state; on this host an older protector is refused outright. A key this
// host imported for the TPM is replaced by the new one.
//
// Re-keying needs the TPM stopped: a running TPM is refused with an error
// matching errdefs.ErrFailedPrecondition, and nothing changes. Only a host
// holding the protector's owner can.
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
	return h.rekey(dir, fps[0])
}

// forChange reads dir's protector and opens its key on this host, which
// must hold the protector's owner.
func (h *Broker) forChange(dir string) (*guardian.Protector, *guardian.Guardian, *Key, error) {
	p, err := ReadProtector(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	owner, err := h.Find(p.Owner().Fingerprint())
	if err != nil || !owner.HasPrivate() {
		return nil, nil, nil, errdefs.New(errdefs.ErrPermissionDenied, "only the owner of TPM %s, guardian %s (%s), can change its protector; run this on a host that holds it",
			p.TPM(), p.Owner().Name(), p.Owner().Fingerprint())
	}
	o, err := h.OpenTPM(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	if !p.Holds(o.Key.bytes()) {
		o.Close()
		return nil, nil, nil, errdefs.New(errdefs.ErrConflict, "%s changed while it was read; try again", protectorPath(dir))
	}
	return p, owner, o.Key, nil
}

// rekey is Revoke of the guardian with fingerprint fp.
func (h *Broker) rekey(dir, fp string) (*guardian.Protector, error) {
	p, owner, key, err := h.forChange(dir)
	if err != nil {
		return nil, err
	}
	defer key.Close()
	next, err := randomKey(p.TPM())
	if err != nil {
		return nil, err
	}
	defer next.Close()
	q, err := p.Rekey(next.bytes(), owner, fp)
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
	err = seal.Rekey(dir, seal.Options{Key: key.bytes(), Generations: h.Generations(), Logger: h.log}, next.bytes(), commit)
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
		if err := h.ks.Put(kindTPMKey, q.TPM().String(), next.bytes()); err != nil {
			errs = append(errs, fmt.Errorf("replace the key imported for the TPM: %w", err))
		}
	}
	if len(errs) > 0 {
		return q, fmt.Errorf("revoked and re-keyed TPM %s, but: %w", q.TPM(), errors.Join(errs...))
	}
	return q, nil
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

// ImportKeyFile decrypts data, a key file made by [Broker.ExportKey] (name
// is its file's, for messages), with passphrase and stores its key (see
// importKey). It returns the TPM the key belongs to; a file that does not
// decrypt is a *KeyFileError.
func (h *Broker) ImportKeyFile(name string, data []byte, passphrase string, replace bool) (uuid.UUID, error) {
	k, err := keyfile.Decrypt(data, passphrase)
	if err != nil {
		return uuid.Nil, &KeyFileError{File: name, Err: err}
	}
	defer clear(k.DEK)
	return k.TPM, h.importKey(k.TPM, k.DEK, replace)
}

// KeyFileError is a key file that does not decrypt (wrong passphrase, not a
// key file, damaged).
type KeyFileError struct {
	File string // the file's name, when known
	Err  error
}

func (e *KeyFileError) Error() string {
	if e.File == "" {
		return e.Err.Error()
	}
	return e.File + ": " + e.Err.Error()
}

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
