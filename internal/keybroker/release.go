package keybroker

import (
	"fmt"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/seal"
)

// AcceptReleased takes a data key that came from outside this host's
// keystore for the TPM in dir: the key service released it, having opened
// the protector's fleet row for this host. The key service's decision is
// the admission (a fleet row is what lets any attested host of the fleet
// run the TPM, so the protector's owner need not be trusted here); what
// this host knows still applies: the key must be the one p holds, p must
// not be older than the newest protector version seen here (unless
// opts.AllowRollback), and the key must open the state. Then p's version
// is recorded as seen. by names where the key came from, for logs. On
// success the returned Opened owns k; on failure k is closed.
func (h *Broker) AcceptReleased(dir string, p *guardian.Protector, k *Key, by string, opts OpenOptions) (*Opened, error) {
	fail := func(err error) (*Opened, error) {
		k.Close()
		return nil, err
	}
	id, err := seal.Identify(dir)
	if err != nil {
		return fail(err)
	}
	if p.TPM() != id || k.TPM() != id {
		return fail(errdefs.New(errdefs.ErrDataLoss, "the released key is for TPM %s, but %s holds TPM %s", k.TPM(), dir, id))
	}
	if !p.Holds(k.bytes()) {
		return fail(errdefs.New(errdefs.ErrDataLoss, "the key released for TPM %s fails the key check of %s", id, protectorPath(dir)))
	}
	if err := h.checkOpened(dir, p, k.bytes(), by, opts); err != nil {
		return fail(fmt.Errorf("key released for TPM %s: %w", id, err))
	}
	return &Opened{TPM: id, Key: k, By: by}, nil
}

// AdoptReleased is OpenAdopted for a key the key service released from the
// fleet row of rec's protector: the key must be the one the protector
// holds, the protector no older than one seen here (unless
// opts.AllowRollback), and the record must verify under the migration key
// derived from the key, so that it belongs to the stream. On success the
// returned Opened owns k; on failure k is closed.
func (h *Broker) AdoptReleased(rec *AdoptRecord, k *Key, by string, opts OpenOptions) (*Opened, *guardian.Protector, error) {
	fail := func(err error) (*Opened, *guardian.Protector, error) {
		k.Close()
		return nil, nil, err
	}
	p, err := rec.ParsedProtector()
	if err != nil {
		return fail(err)
	}
	if k.TPM() != rec.TPM || !p.Holds(k.bytes()) {
		return fail(errdefs.New(errdefs.ErrDataLoss, "the key released for TPM %s fails the key check of the protector in the stream", rec.TPM))
	}
	if err := h.checkRollback("", p, opts); err != nil {
		return fail(err)
	}
	if err := rec.verifyKey(k); err != nil {
		return fail(err)
	}
	return &Opened{TPM: rec.TPM, Key: k, By: by}, p, nil
}
