package manufacture

import (
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/seal"
	"vtpm/internal/state"
	"vtpm/internal/swtpm/statefile"
)

// OpenBroker opens this host's key broker; it is called only once a command
// needs keys, so that refused requests leave the keystore alone.
type OpenBroker func() (*keybroker.Broker, error)

// Issuer issues EK and platform certificates: this host's local CA (*CA),
// or the host service's for a process that cannot open the keystore.
type Issuer interface {
	EKCertificate(ek crypto.PublicKey, id Identity, now time.Time) ([]byte, error)
	PlatformCertificate(ek crypto.PublicKey, id Identity, now time.Time) ([]byte, error)
}

// Host is what manufacturing needs of this host: TPMs' data keys and
// generation records, and the local CA.
type Host interface {
	state.Keys
	// CA returns the local CA, creating it on first use.
	CA() (Issuer, error)
	Close() error
}

// OpenHost opens a Host; like OpenBroker, it is called only once a
// command needs keys.
type OpenHost func() (Host, error)

// FromBroker is the host as open opens its key broker.
func FromBroker(open OpenBroker) OpenHost {
	return func() (Host, error) {
		h, err := open()
		if err != nil {
			return nil, err
		}
		return brokerHost{h}, nil
	}
}

type brokerHost struct{ *keybroker.Broker }

func (h brokerHost) CA() (Issuer, error) { return LoadCA(h.Keystore()) }

// Open opens dir in the format the swtpm socket instance will serve it in:
// swtpmKey (an swtpm --key option) selects swtpm's encrypted files, and
// $VTPM_STATE_FORMAT, when set, chooses a new directory's format.
func Open(h state.Keys, dir, swtpmKey string, log *slog.Logger) (*state.Opened, error) {
	want, err := state.FormatFromEnv(os.Getenv)
	if err != nil {
		return nil, err
	}
	format, err := state.ChooseExplicit(dir, swtpmKey != "", want)
	if err != nil {
		return nil, err
	}
	if format == state.Swtpm {
		var key *statefile.Key
		if swtpmKey != "" {
			k, err := statefile.ParseKeyOption(swtpmKey)
			if err != nil {
				return nil, fmt.Errorf("state encryption key: %w", err)
			}
			key = k
		}
		return state.OpenSwtpm(dir, key, statefile.DefaultMode)
	}
	return state.OpenSealed(h, dir, log)
}

// Request is one manufacture (or PCR reconfiguration) of a state directory.
type Request struct {
	Dir      string
	SwtpmKey string // swtpm --key option text; selects swtpm's file format
	Options  Options
	Log      *slog.Logger
}

// Result is what Run made.
type Result struct {
	Report *Report
	TPM    uuid.UUID
	Format state.Format
}

// Run manufactures the TPM in r.Dir in-process, with this host's CA.
func Run(open OpenBroker, r Request) (*Result, error) { return RunOn(FromBroker(open), r) }

// RunOn is Run on the host open opens.
func RunOn(open OpenHost, r Request) (*Result, error) {
	h, err := open()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	if r.Options.EKCerts || r.Options.PlatformCert {
		if r.Options.CA, err = h.CA(); err != nil {
			return nil, err
		}
	}
	st, err := Open(h, r.Dir, r.SwtpmKey, r.Log)
	if err != nil {
		return nil, err
	}
	defer st.Storage.Close()
	r.Options.Identity.TPM = st.TPM
	rep, err := Manufacture(st.Storage, r.Options)
	if err != nil {
		return nil, err
	}
	return &Result{Report: rep, TPM: st.TPM, Format: st.Format}, nil
}

// Make manufactures a new TPM in dir. A TPM already there is replaced (its
// secrets gone) only when overwrite is set.
func Make(open OpenBroker, dir string, overwrite bool, o Options, log *slog.Logger) (*Result, error) {
	if state.HasState(dir) {
		if !overwrite {
			return nil, errdefs.New(errdefs.ErrAlreadyExists, "%s already holds a TPM; nothing was changed (pass --overwrite to replace it with a new TPM, whose secrets are gone)", dir)
		}
		if err := state.Remove(dir); err != nil {
			return nil, err
		}
	}
	res, err := Run(open, Request{Dir: dir, Options: o, Log: log})
	if err != nil {
		return nil, fmt.Errorf("manufacture %s: %w", dir, err)
	}
	return res, nil
}

// Show describes the TPM in dir without changing it. swtpmKey opens swtpm
// files encrypted with a key. A directory without TPM state is refused
// before the broker is opened.
func Show(open OpenBroker, dir, swtpmKey string, log *slog.Logger) (*Summary, error) {
	if !state.HasState(dir) {
		return nil, errdefs.New(errdefs.ErrNotFound, "%s holds no TPM state", dir).
			With(errdefs.Do(errdefs.ActionTPMManufacture, "dir", dir).WithNote("create one"))
	}
	h, err := open()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	s, err := show(h, dir, swtpmKey, log)
	if errors.Is(err, seal.ErrLocked) {
		return nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "%s is in use by a running TPM; stop it to inspect it", dir)
	}
	return s, err
}

func show(h *keybroker.Broker, dir, swtpmKey string, log *slog.Logger) (*Summary, error) {
	st, err := Open(h, dir, swtpmKey, log)
	if err != nil {
		return nil, err
	}
	defer st.Storage.Close()
	info, err := Inspect(st.Storage)
	if err != nil {
		return nil, err
	}
	return summarize(dir, st, info), nil
}
