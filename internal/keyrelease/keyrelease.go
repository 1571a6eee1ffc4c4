// Package keyrelease is the host service's side of key release: it keeps
// the host attested with the key service (a health certificate, renewed
// before it expires and at start) and asks the key service for the data
// key of a TPM that no guardian of this host opens but whose protector has
// a fleet row. The key arrives HPKE-sealed to a one-time key of this
// request and is handed to the vTPM like a key opened here; it is never
// stored on the host.
//
// # Configuration
//
// The host's key-service client bundle (as the key service's `host add`
// writes it: the host's name and certificate with role host, the service
// CA, every node's URL) is read from Options.Bundle, by default
// <data root>/keyservice.json (BundleFile). Options.Endpoints, when set,
// replaces the bundle's node URLs. Without a bundle the host service runs
// without a key service.
//
// The host attests in key mode (it proves it holds its guardian's key) or,
// registered in TPM mode, with its TPM (Options.Prover: tpmmode.Prover,
// which reads the host TPM and its measured-boot event log).
//
// The fleet guardian's certificates, once fetched, are kept in
// <data root>/fleet-guardian.pem (hostsvc.FleetFile), so that a vTPM
// that opens the keystore itself knows a fleet row when it sees one, even
// while the key service is down.
package keyrelease

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"vtpm/internal/guardian"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/keyservice/client"
)

// BundleFile, in the data root, is the host's key-service client bundle.
const BundleFile = "keyservice.json"

// Options configure a Releaser.
type Options struct {
	// Bundle is the host's client bundle (default <data root>/BundleFile;
	// none there: no key service).
	Bundle string
	// Endpoints, when set, replace the bundle's node URLs.
	Endpoints []string
	// Timeout bounds one call to one node (the client's default when 0).
	Timeout time.Duration
	// Prover attests the host; nil is key mode (the host proves it holds
	// its guardian's key). TPM mode (the host's TPM quotes its boot) is
	// tpmmode.Prover, for a host registered with --mode tpm.
	Prover client.Prover
	Logger *slog.Logger
}

// Configured reports whether opts, or dataRoot's default bundle, give a
// key service.
func (o Options) Configured(dataRoot string) bool {
	if o.Bundle != "" {
		return true
	}
	_, err := os.Stat(filepath.Join(dataRoot, BundleFile))
	return err == nil
}

// Releaser is the host's client of the key service. It implements
// hostsvc.Releaser. Make one with New; Run keeps it attested.
type Releaser struct {
	dataRoot string
	c        *client.Client
	host     *client.Host
	name     string
	log      *slog.Logger
	fleet    atomic.Pointer[guardian.Guardian]
	// attesting keeps a renewal from superseding the health certificate
	// of a release in flight (the service refuses a superseded one).
	attesting sync.RWMutex
}

var _ hostsvc.Releaser = (*Releaser)(nil)

// New returns the releaser of the host whose data root is dataRoot and
// whose guardian (with its private keys: it proves the host in key mode)
// is local. It reads the bundle; it calls nothing yet.
func New(dataRoot string, local *guardian.Guardian, opts Options) (*Releaser, error) {
	path := opts.Bundle
	if path == "" {
		path = filepath.Join(dataRoot, BundleFile)
	}
	b, err := client.ReadBundle(path)
	if err != nil {
		return nil, fmt.Errorf("the host's key service client bundle: %w", err)
	}
	if len(opts.Endpoints) > 0 {
		b.Endpoints = opts.Endpoints
	}
	c, err := client.New(b, client.Options{Timeout: opts.Timeout})
	if err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	prover := opts.Prover
	if prover == nil {
		prover = client.KeyProver{Host: b.Name, Guardian: local}
	}
	r := &Releaser{dataRoot: dataRoot, c: c, name: b.Name, log: log, host: client.NewHost(c, prover)}
	// The fleet guardian known from an earlier run serves until the key
	// service answers.
	if g, err := guardian.ReadCertificates(filepath.Join(dataRoot, hostsvc.FleetFile)); err == nil {
		r.fleet.Store(g)
	} else if !errors.Is(err, fs.ErrNotExist) {
		log.Warn("key service: the fleet guardian's certificates kept here do not read", "file", hostsvc.FleetFile, "err", err)
	}
	return r, nil
}

// Endpoints are the key service's node URLs.
func (r *Releaser) Endpoints() []string { return r.c.Bundle().Endpoints }

// Name is the host's name at the key service.
func (r *Releaser) Name() string { return r.name }

// Fleet is the fleet guardian (public), nil while not known.
func (r *Releaser) Fleet() *guardian.Guardian { return r.fleet.Load() }

// FleetCertificates asks the key service for the fleet guardian's
// certificates (PEM), and keeps them.
func (r *Releaser) FleetCertificates(ctx context.Context) ([]byte, error) {
	resp, err := r.c.FleetGuardian(ctx)
	if err != nil {
		return nil, err
	}
	g, err := guardian.ParseCertificates(resp.Certificates)
	if err != nil {
		return nil, fmt.Errorf("the key service's fleet guardian: %w", err)
	}
	if old := r.fleet.Swap(g); old == nil || old.Fingerprint() != g.Fingerprint() {
		r.log.Info("key service: fleet guardian", "name", g.Name(), "fingerprint", g.Fingerprint())
	}
	if err := hostsvc.WriteFleet(r.dataRoot, resp.Certificates); err != nil {
		r.log.Warn("key service: cannot keep the fleet guardian's certificates", "err", err)
	}
	return resp.Certificates, nil
}

// Attest attests the host now.
func (r *Releaser) Attest(ctx context.Context) (time.Time, error) {
	r.attesting.Lock()
	notAfter, err := r.host.Attest(ctx)
	r.attesting.Unlock()
	if err != nil {
		return time.Time{}, err
	}
	r.log.Info("key service: attested", "host", r.name, "health_certificate_until", notAfter.Format(time.RFC3339))
	return notAfter, nil
}

// Release asks the key service for the data key of the TPM whose
// protector is given, attesting first when the health certificate is
// missing or about to expire.
func (r *Releaser) Release(ctx context.Context, protector []byte) (*keybroker.Key, error) {
	r.ensureHealthy(ctx)
	r.attesting.RLock()
	k, err := r.host.Release(ctx, protector)
	r.attesting.RUnlock()
	if err != nil {
		r.log.Warn("key service: no key released", "err", err)
		return nil, err
	}
	r.log.Info("key service: released a TPM's key", "tpm", k.TPM())
	return k, nil
}

// ensureHealthy attests when the health certificate is missing or near
// its end, once for releases that ask at the same time, and never while a
// release is in flight. Its failure shows in the release that follows.
func (r *Releaser) ensureHealthy(ctx context.Context) {
	stale := func() bool {
		cert, notAfter := r.host.Health()
		return cert == nil || time.Until(notAfter) < renewSpare
	}
	if !stale() {
		return
	}
	r.attesting.Lock()
	defer r.attesting.Unlock()
	if stale() {
		if _, err := r.host.Attest(ctx); err == nil {
			r.log.Info("key service: attested before a release", "host", r.name)
		}
	}
}

// renewSpare: a health certificate with less left than this is renewed
// before a release uses it.
const renewSpare = 2 * time.Minute

// Run keeps the host known to the key service until ctx ends: it fetches
// the fleet guardian and attests at start, and attests again before the
// health certificate expires. A key service that cannot be reached is
// retried with growing pauses (running VMs need nothing from it; a start
// that needs a key attests on its own).
func (r *Releaser) Run(ctx context.Context) {
	backoff := time.Second
	fail := func(what string, err error) time.Duration {
		r.log.Warn("key service: "+what+" failed; retrying", "err", err, "in", backoff)
		d := backoff
		backoff = min(2*backoff, time.Minute)
		return d
	}
	for {
		var wait time.Duration
		if r.Fleet() == nil || backoff > time.Second {
			if _, err := r.FleetCertificates(ctx); err != nil && ctx.Err() == nil {
				r.log.Warn("key service: cannot fetch the fleet guardian", "err", err)
			}
		}
		notAfter, err := r.Attest(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			wait = fail("attestation", err)
		} else {
			backoff = time.Second
			wait = renewIn(time.Until(notAfter))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// renewIn is when to attest again, given how long the health certificate
// has left: with a fifth of it to spare, at least a minute before its end
// (Release renews a certificate within a minute of its end itself).
func renewIn(left time.Duration) time.Duration {
	spare := max(left/5, renewSpare)
	return max(left-spare, 5*time.Second)
}
