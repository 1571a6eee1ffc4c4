package instance

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/seal"
	"vtpm/internal/state"
	"vtpm/internal/swtpm/statefile"
)

// Live migration into an empty directory.
//
// A sealed TPM's migration key is derived from its data key, so a
// destination needs the TPM's key protector to read the stream. The
// source's permanent-state blob therefore carries one more record
// (statefile.TagVTPM, which swtpm passes over): the TPM's UUID, its signed
// protector.json and the generations of its blobs, followed by an
// HMAC-SHA256 under the migration key over the record and the rest of the
// blob. The protector's signature says who wrote it; the MAC, which only a
// holder of the data key can make, binds the record to this stream. The
// data key itself never travels: the destination opens it from the
// protector with its own guardians, as it would open protector.json.
//
// A destination started on an empty directory provisions a new TPM as
// always (identity, protector, generation record, all before
// confinement) but keeps the host's key broker open, read-only, until the
// TPM is first initialised. When a permanent-state blob for another TPM
// arrives first, and nothing was sealed under the new identity yet, it
// adopts that TPM: it opens the key from the carried protector (refusing,
// with a log line naming the guardians that could, when this host cannot),
// checks the MAC, writes the TPM's identity and protector into the
// directory and reopens the sealed store with the TPM's key. The broker is
// closed then, or at CMD_INIT, whichever comes first.

// adoptMargin lifts the adopted TPM's generations above the source's: the
// source may still write a few (its TPM2_Shutdown when QEMU stops it) after
// the blob was taken, and this host may have recorded them.
const adoptMargin = 1 << 16

// withAdoptRecord appends the adoption record to a permanent-state blob
// when the stream's key is derived from the TPM's data key (a destination
// given --migration-key, or swtpm, needs no record and gets none).
func (in *Instance) withAdoptRecord(blob []byte) ([]byte, error) {
	if in.migMem == nil || in.sealing == nil || in.sealed == nil || in.sealing.tpm == uuid.Nil || in.ext.DataKey != "" {
		return blob, nil // a --data-key TPM has no protector to carry
	}
	prot, err := os.ReadFile(filepath.Join(in.sealed.Dir(), keybroker.ProtectorFile))
	if errors.Is(err, fs.ErrNotExist) {
		return blob, nil // opened by an imported key: nothing to adopt it by
	}
	if err != nil {
		return nil, fmt.Errorf("read the key protector to migrate with the TPM: %w", err)
	}
	rec := &keybroker.AdoptRecord{TPM: in.sealing.tpm, Protector: prot, Generations: map[string]uint64{}}
	for _, n := range seal.Names {
		if g, err := in.sealed.Generation(n); err == nil {
			rec.Generations[n] = g
		}
	}
	return keybroker.AppendAdoptRecord(blob, rec, in.migMem.Bytes())
}

// AdoptError refuses a TPM arriving in a migration stream: which TPM, and
// why (a *keybroker.MissingKeyError names the guardians that could open
// it, and its remedies are the ways out).
type AdoptError struct {
	TPM uuid.UUID
	Err error
}

func (e *AdoptError) Error() string {
	return fmt.Sprintf("cannot adopt TPM %s from the migration stream: %v", e.TPM, e.Err)
}

func (e *AdoptError) Unwrap() error { return e.Err }

// Remedies are those of the cause.
func (e *AdoptError) Remedies() []errdefs.Remedy { return errdefs.Remedies(e.Err) }

// adoptFromBlob handles the adoption record of a permanent-state blob and
// returns the blob without it. See the package's migration notes above.
func (in *Instance) adoptFromBlob(blob []byte) ([]byte, error) {
	rest, rec, err := keybroker.ParseAdoptRecord(blob)
	if err != nil {
		return nil, err
	}
	if rec == nil || in.sealing == nil {
		return rest, nil
	}
	if rec.TPM == in.sealing.tpm {
		// The directory already holds this TPM (prepared, or adopted by
		// an earlier blob): the stream's key is ours.
		if in.migMem != nil && !rec.Verify(in.migMem.Bytes()) {
			return nil, &AdoptError{TPM: rec.TPM, Err: errdefs.New(errdefs.ErrPermissionDenied, "the vtpm record does not verify under the TPM's migration key")}
		}
		return rest, nil
	}
	if (in.sealing.adopter == nil && in.sealing.service == nil) || seal.HasBlobs(in.opts.StateDir) {
		return nil, &AdoptError{TPM: rec.TPM, Err: errdefs.New(errdefs.ErrFailedPrecondition,
			"this instance serves TPM %s in %s; it adopts a TPM from the stream only when started on an empty state directory, before the TPM is initialised", in.sealing.tpm, in.opts.StateDir)}
	}
	opts := keybroker.OpenOptions{AllowRollback: in.ext.AllowRollback}
	var (
		key    *keybroker.Key
		by     string
		prot   *guardian.Protector // to write; nil when the host service wrote it
		record *keystore.Pinned    // the TPM's record here, when the host service shared it
	)
	if in.sealing.adopter != nil {
		o, p, err := in.sealing.adopter.OpenAdopted(in.opts.StateDir, rec, opts)
		if err != nil {
			return nil, &AdoptError{TPM: rec.TPM, Err: err}
		}
		key, by, prot = o.Key, o.By, p
	} else {
		// This process cannot read the keystore (it runs as another
		// user): the host service, on the connection kept for this,
		// checks the stream, writes the TPM's identity and protector into
		// the directory this process holds, and hands over the key and
		// the TPM's generation record.
		mode := os.FileMode(0o600)
		if in.opts.StateModeSet {
			mode = in.opts.StateMode
		}
		o, err := in.sealing.service.Adopt(in.opts.StateDir, blob, mode, opts)
		in.sealing.dropAdopter() // one request per connection
		if err != nil {
			return nil, &AdoptError{TPM: rec.TPM, Err: err}
		}
		if o.TPM != rec.TPM {
			o.Close()
			return nil, &AdoptError{TPM: rec.TPM, Err: errdefs.New(errdefs.ErrInternal, "the host service adopted TPM %s", o.TPM)}
		}
		key, by, record = o.Key, o.By, o.Record
	}
	fail := func(err error) ([]byte, error) {
		key.Close()
		if record != nil {
			record.Close()
		}
		if prot == nil && err != nil {
			// The host service has written the TPM's identity into the
			// directory, which no longer names the TPM this instance
			// serves: it cannot go on.
			in.finish(err)
		}
		return nil, err
	}
	if err := in.sandbox.KeyMemory(key.LockErr()); err != nil {
		return fail(&AdoptError{TPM: rec.TPM, Err: err})
	}
	mig, err := key.MigrationKey()
	if err != nil {
		return fail(err)
	}
	if !rec.Verify(mig.Bytes()) {
		mig.Close()
		return fail(&AdoptError{TPM: rec.TPM, Err: errdefs.New(errdefs.ErrPermissionDenied, "the vtpm record does not verify under the key its protector holds")})
	}
	if err := in.switchTo(rec.TPM, prot, key, rec.Generations, record); err != nil {
		mig.Close()
		fail(nil)
		// The directory may be half switched: this instance cannot go on.
		in.finish(err)
		return nil, err
	}
	in.migMem.Close()
	in.migMem = mig
	in.migKey = &statefile.Key{Bytes: mig.Bytes()}
	in.log.Info("adopted the TPM from the migration stream", "tpm", rec.TPM, "by", by, "state", in.opts.StateDir)
	if record == nil {
		in.log.Warn("rollback protection of the adopted TPM is recorded on this host from its next start", "tpm", rec.TPM)
	}
	return rest, nil
}

// switchTo makes the state directory TPM id's, sealed with key. p is the
// protector to write (nil when it is written already, with the identity);
// record is the TPM's generation record on this host, if this process has
// one (else generations are not recorded until the next start).
func (in *Instance) switchTo(id uuid.UUID, p *guardian.Protector, key *keybroker.Key, gens map[string]uint64, record *keystore.Pinned) error {
	if err := in.swap.close(); err != nil {
		return err
	}
	mode := os.FileMode(0o600)
	if in.opts.StateModeSet {
		mode = in.opts.StateMode
	}
	if p != nil {
		if err := seal.Adopt(in.opts.StateDir, id, mode); err != nil {
			return err
		}
		if err := keybroker.WriteProtector(in.opts.StateDir, p); err != nil {
			return err
		}
	}
	floor := &floorGenerations{id: id, last: map[string]uint64{}}
	if record != nil {
		floor.record = record
	}
	for n, g := range gens {
		floor.last[n] = g + adoptMargin
	}
	o, err := state.OpenSealedWith(in.opts.StateDir, key, seal.Options{
		Generations: floor, AllowRollback: in.ext.AllowRollback, FileMode: mode, Logger: in.log,
	})
	if err != nil {
		return err
	}
	in.sealing.key.Close()
	in.sealing.key, in.sealing.tpm = key, id
	in.sealing.dropAdopter()
	if in.sealing.pinned != nil {
		in.sealing.pinned.Close() // the abandoned identity's record
	}
	in.sealing.pinned = record
	in.sealed = o.Store
	in.swap.set(o.Storage)
	return nil
}

// floorGenerations starts an adopted TPM's generations above the source's.
// With record (the TPM's record on this host, handed over by the host
// service) it records there and never starts below it; without, it records
// nothing: the confined instance cannot create the TPM's record on this
// host, which its next start does.
type floorGenerations struct {
	id     uuid.UUID
	last   map[string]uint64
	record seal.Generations
}

func (f *floorGenerations) Last(id uuid.UUID, name string) (uint64, error) {
	if id != f.id {
		return 0, fmt.Errorf("generations of TPM %s asked of TPM %s's", id, f.id)
	}
	last := f.last[name]
	if f.record != nil {
		r, err := f.record.Last(id, name)
		if err != nil {
			return 0, err
		}
		last = max(last, r)
	}
	return last, nil
}

func (f *floorGenerations) Record(id uuid.UUID, name string, gen uint64) error {
	if f.record == nil {
		return nil
	}
	return f.record.Record(id, name, gen)
}

// swapStore is the storage libtpms holds (fixed when it is opened), which
// an adoption points at the adopted TPM's store.
type swapStore struct {
	mu sync.Mutex
	s  state.Storage // nil while switching
}

var errSwitching = errors.New("the TPM state store is being switched to an adopted TPM")

func (w *swapStore) get() (state.Storage, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.s == nil {
		return nil, errSwitching
	}
	return w.s, nil
}

func (w *swapStore) set(s state.Storage) {
	w.mu.Lock()
	w.s = s
	w.mu.Unlock()
}

// close closes the current store and leaves none.
func (w *swapStore) close() error {
	w.mu.Lock()
	s := w.s
	w.s = nil
	w.mu.Unlock()
	if s == nil {
		return nil
	}
	return s.Close()
}

func (w *swapStore) Init() error {
	s, err := w.get()
	if err != nil {
		return err
	}
	return s.Init()
}

func (w *swapStore) Load(name string) ([]byte, error) {
	s, err := w.get()
	if err != nil {
		return nil, err
	}
	return s.Load(name)
}

func (w *swapStore) Store(name string, data []byte) error {
	s, err := w.get()
	if err != nil {
		return err
	}
	return s.Store(name, data)
}

func (w *swapStore) Delete(name string, mustExist bool) error {
	s, err := w.get()
	if err != nil {
		return err
	}
	return s.Delete(name, mustExist)
}

func (w *swapStore) Close() error { return w.close() }

// logAdoptError logs a refused adoption with what an operator needs: the
// TPM, the guardians that could open it, and the ways out.
func (in *Instance) logAdoptError(err error) {
	var ae *AdoptError
	if !errors.As(err, &ae) {
		in.log.Error("CMD_SET_STATEBLOB rejected the blob", "err", err)
		return
	}
	attrs := []any{"tpm", ae.TPM, "err", err}
	var mk *keybroker.MissingKeyError
	var se *hostsvc.ServiceError
	switch {
	case errors.As(err, &mk):
		var gs []string
		for _, r := range mk.Rows {
			gs = append(gs, fmt.Sprintf("%s (%s)", r.Name, r.Fingerprint))
		}
		attrs = append(attrs, "guardians", strings.Join(gs, ", "))
	case errors.As(err, &se) && len(se.Guardians) > 0:
		// The host service's refusal, as data.
		attrs = append(attrs, "guardians", strings.Join(se.Guardians, ", "))
	}
	var fix []string
	for _, r := range errdefs.Remedies(err) {
		s := string(r.Action)
		for k, v := range r.Args {
			s += fmt.Sprintf(" %s=%s", k, v)
		}
		if r.Note != "" {
			s += ": " + r.Note
		}
		if r.Where != "" {
			s += " (" + r.Where + ")"
		}
		fix = append(fix, strings.TrimSpace(s))
	}
	if len(fix) > 0 {
		attrs = append(attrs, "fix", strings.Join(fix, "; "))
	}
	in.log.Error("CMD_SET_STATEBLOB: this host cannot take the TPM from the migration stream", attrs...)
}
