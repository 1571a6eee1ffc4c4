package hostsvc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
)

// FleetFile, in the data root, holds the certificates (PEM) of the fleet
// guardian of the key service this host's service asks for keys. The host
// service writes it when it reaches the key service; a vTPM that opens the
// keystore itself reads it to tell a protector's fleet row from another
// host's row, and asks the host service for the key only for the former.
// It holds public certificates only (mode 0644).
const FleetFile = "fleet-guardian.pem"

// Releaser gets a TPM's data key from the key service: the host service
// asks it when no guardian of this host opens a protector that has a
// fleet row. It lives in the host service's executable (it links the key
// service's API); vtpm, which every vTPM runs, does not link it.
type Releaser interface {
	// Fleet is the fleet guardian (public), nil while it is not known.
	Fleet() *guardian.Guardian
	// Release asks the key service for the data key of the TPM whose
	// protector (as stored) is given. The key is never stored.
	Release(ctx context.Context, protector []byte) (*keybroker.Key, error)
}

// releaseTimeout bounds one release, all of the key service's nodes tried
// (the key socket's connection allows requestTimeout).
const releaseTimeout = requestTimeout - 5*time.Second

// FleetRow returns the fleet guardian's row of a protector that this host
// cannot open, when dataRoot's FleetFile names the fleet guardian and one
// of rows is its row.
func FleetRow(dataRoot string, rows []guardian.Row) (guardian.Row, bool) {
	g, err := guardian.ReadCertificates(filepath.Join(dataRoot, FleetFile))
	if err != nil {
		return guardian.Row{}, false
	}
	return rowOf(g, rows)
}

func rowOf(g *guardian.Guardian, rows []guardian.Row) (guardian.Row, bool) {
	if g == nil {
		return guardian.Row{}, false
	}
	for _, r := range rows {
		if r.Fingerprint == g.Fingerprint() {
			return r, true
		}
	}
	return guardian.Row{}, false
}

// WriteFleet records the fleet guardian's certificates in dataRoot's
// FleetFile, when they differ from what it holds.
func WriteFleet(dataRoot string, certs []byte) error {
	path := filepath.Join(dataRoot, FleetFile)
	if old, err := os.ReadFile(path); err == nil && string(old) == string(certs) {
		return nil
	}
	return atomicfile.Write(path, certs, 0o644)
}

// releasable says whether rows include the fleet guardian's row, which the
// key service may open for this host.
func (s *Server) releasable(rows []guardian.Row) bool {
	if s.Releaser == nil {
		return false
	}
	_, ok := rowOf(s.Releaser.Fleet(), rows)
	return ok
}

// askKeyService asks the key service for the key of protector. The
// caller holds s.mu, which is let go meanwhile: nothing of this host has
// changed yet, the caller holds the TPM's state directory, and the other
// vTPMs need not wait for the key service (up to releaseTimeout when its
// nodes do not answer).
func (s *Server) askKeyService(protector []byte) (*keybroker.Key, error) {
	ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
	defer cancel()
	s.mu.Unlock()
	defer s.mu.Lock()
	return s.Releaser.Release(ctx, protector)
}

// release opens the TPM in dir through the key service, after the broker
// found no guardian of this host for it (missing). The protector must have
// the fleet guardian's row; the released key is checked as a key opened
// here is (AcceptReleased).
func (s *Server) release(dir string, missing *keybroker.MissingKeyError, allowRollback bool) (*keybroker.Opened, error) {
	if s.Releaser == nil {
		return nil, missing
	}
	fleet := s.Releaser.Fleet()
	row, ok := rowOf(fleet, missing.Rows)
	if !ok {
		return nil, missing
	}
	raw, err := os.ReadFile(filepath.Join(dir, keybroker.ProtectorFile))
	if err != nil {
		return nil, err
	}
	p, err := guardian.ParseProtector(raw)
	if err != nil {
		return nil, err
	}
	k, err := s.askKeyService(raw)
	if err != nil {
		return nil, &ReleaseError{TPM: missing.TPM.String(), Fleet: row.Name, Err: err}
	}
	return s.broker.AcceptReleased(dir, p, k, "key service ("+row.Name+")", keybroker.OpenOptions{AllowRollback: allowRollback})
}

// adoptReleased opens the key of the TPM a migration stream carries
// through the key service, after the broker found no guardian of this host
// for the record's protector (missing).
func (s *Server) adoptReleased(rec *keybroker.AdoptRecord, missing *keybroker.MissingKeyError, allowRollback bool) (*keybroker.Opened, *guardian.Protector, error) {
	if s.Releaser == nil {
		return nil, nil, missing
	}
	row, ok := rowOf(s.Releaser.Fleet(), missing.Rows)
	if !ok {
		return nil, nil, missing
	}
	k, err := s.askKeyService(rec.Protector)
	if err != nil {
		return nil, nil, &ReleaseError{TPM: rec.TPM.String(), Fleet: row.Name, Err: err}
	}
	return s.broker.AdoptReleased(rec, k, "key service ("+row.Name+")", keybroker.OpenOptions{AllowRollback: allowRollback})
}

// ReleaseError: no guardian of this host opens a TPM, and the key service
// did not release its key through the protector's fleet row. Err says why
// (the key service's denial and its reason, or the nodes tried and their
// state); its kind and remedies are the error's.
type ReleaseError struct {
	TPM   string
	Fleet string // the fleet guardian's name
	Err   error
}

func (e *ReleaseError) Error() string {
	return fmt.Sprintf("no guardian of this host opens TPM %s, and the key service did not release its key (fleet guardian %s): %v", e.TPM, e.Fleet, e.Err)
}

func (e *ReleaseError) Unwrap() error { return e.Err }

// Remedies are the cause's.
func (e *ReleaseError) Remedies() []errdefs.Remedy { return errdefs.Remedies(e.Err) }

// FleetError: a vTPM that opens the keystore itself found no guardian of
// this host for its TPM, whose protector has a fleet row, and the host
// service did not hand over the key the key service would release.
type FleetError struct {
	Missing *keybroker.MissingKeyError
	Service error // the host service's answer, or why it could not be reached
}

func (e *FleetError) Error() string {
	var u *UnavailableError
	if errors.As(e.Service, &u) {
		return fmt.Sprintf("no guardian of this host opens TPM %s (%s), and the host service, which would ask the key service for its key, did not answer: %v",
			e.Missing.TPM, e.Missing.Dir, e.Service)
	}
	// The service's answer says what it tried.
	return fmt.Sprintf("%s: %v", e.Missing.Dir, e.Service)
}

func (e *FleetError) Unwrap() error { return e.Service }

// Remedies are the host service's; when it could not be reached, also
// the ways to open the TPM without the key service.
func (e *FleetError) Remedies() []errdefs.Remedy {
	rs := errdefs.Remedies(e.Service)
	var u *UnavailableError
	if errors.As(e.Service, &u) {
		rs = append(rs, e.Missing.Remedies()...)
	}
	return rs
}
