package keybroker

import (
	"errors"
	"fmt"

	"vtpm/internal/guardian"
)

// OpenProtector opens the data key that protector p holds for a TPM whose
// state is about to arrive in dir (a live migration into an empty
// directory), under the rules OpenTPMWith applies to protector.json: a
// guardian of this host opens it and its owner is held or trusted here, or
// this host imported the TPM's key; a protector older than the newest
// version seen here is refused unless opts.AllowRollback. It only reads the
// keystore and writes nothing, so a confined instance can call it; the
// caller checks the key against the state it receives (its migration key
// must authenticate the stream). A host that cannot open it gets a
// *MissingKeyError or an *UntrustedOwnerError.
func (h *Broker) OpenProtector(dir string, p *guardian.Protector, opts OpenOptions) (*Opened, error) {
	if err := h.checkRollback(dir, p, opts); err != nil {
		return nil, err
	}
	gs, err := h.Guardians()
	if err != nil {
		return nil, err
	}
	imported := func() (*Opened, bool) {
		dek, ok := h.importedKey(p.TPM())
		if !ok {
			return nil, false
		}
		if !p.Holds(dek) {
			clear(dek)
			return nil, false
		}
		o, err := opened(p.TPM(), dek, "imported key")
		return o, err == nil
	}
	dek, by, err := p.Open(gs)
	var none *guardian.NoGuardianError
	switch {
	case errors.As(err, &none):
		if o, ok := imported(); ok {
			return o, nil
		}
		return nil, &MissingKeyError{Dir: dir, TPM: p.TPM(), Rows: none.Rows, Held: gs}
	case err != nil:
		return nil, fmt.Errorf("open key protector of TPM %s: %w", p.TPM(), err)
	}
	trusted, err := h.ownerTrusted(p.Owner().Fingerprint(), gs)
	if err != nil {
		clear(dek)
		return nil, err
	}
	if !trusted {
		clear(dek)
		if o, ok := imported(); ok {
			return o, nil
		}
		return nil, &UntrustedOwnerError{Dir: dir, TPM: p.TPM(), Owner: p.Owner().Name(), OwnerFingerprint: p.Owner().Fingerprint()}
	}
	return opened(p.TPM(), dek, by.Name())
}

// checkRollback refuses p when this host saw a newer version of its
// TPM's protector, unless opts.AllowRollback; dir is for the error.
func (h *Broker) checkRollback(dir string, p *guardian.Protector, opts OpenOptions) error {
	seen, err := h.ks.Generations().ProtectorVersion(p.TPM())
	if err != nil {
		return err
	}
	if p.Version() < seen && !opts.AllowRollback {
		return &ProtectorRollbackError{Dir: dir, TPM: p.TPM(), Version: p.Version(), Seen: seen}
	}
	return nil
}
