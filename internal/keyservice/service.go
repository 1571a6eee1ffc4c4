package keyservice

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hpke"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	clientv3 "go.etcd.io/etcd/client/v3"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keyservice/verify"
)

// Service is one node of the key service: its etcd, its service key, and
// the operations of the API, authorized by the caller's Identity. Any node
// answers any request: every decision reads and writes etcd.
type Service struct {
	cfg       Config
	st        *store
	key       *serviceKey
	verifiers map[string]verify.Verifier
	metrics   *Metrics

	ca     atomic.Pointer[authority]
	tlsKey *ecdsa.PrivateKey
	server atomic.Pointer[tls.Certificate]

	fleetMu  sync.Mutex
	fleet    *guardian.Guardian
	fleetRev int64
}

// caRecord is the CA in etcd; its key sealed under the service key.
type caRecord struct {
	Cert      []byte `json:"cert"`
	SealedKey []byte `json:"sealed_key"`
}

// fleetRecord is the fleet guardian in etcd; its private key sealed.
type fleetRecord struct {
	Name        string `json:"name"`
	Fingerprint string `json:"fingerprint"`
	Certs       []byte `json:"certs"` // PEM
	Sealed      []byte `json:"sealed"`
}

// HostRecord is a registered host.
type HostRecord struct {
	Name           string    `json:"name"`
	Mode           string    `json:"mode"`
	Groups         []string  `json:"groups,omitempty"`
	Guardian       []byte    `json:"guardian,omitempty"` // PEM certificates
	EK             []byte    `json:"ek,omitempty"`
	Policy         string    `json:"policy,omitempty"`
	Revoked        bool      `json:"revoked,omitempty"`
	RevokedAt      time.Time `json:"revoked_at,omitzero"`
	Registered     time.Time `json:"registered"`
	Attested       time.Time `json:"attested,omitzero"`
	HealthSerial   string    `json:"health_serial,omitempty"`
	HealthNotAfter time.Time `json:"health_not_after,omitzero"`
	LastFailure    string    `json:"last_failure,omitempty"`
	ClientSerial   string    `json:"client_serial,omitempty"` // the host's client certificate: an earlier one (of a host removed and registered again) is refused
}

// VMPolicy says which host groups may run a TPM's VM; TPM "default"
// applies to every TPM without its own. No groups: any attested host.
type VMPolicy struct {
	TPM    string   `json:"tpm"`
	Groups []string `json:"groups,omitempty"`
}

type nodeRecord struct {
	Name   string `json:"name"`
	APIURL string `json:"api_url"`
}

// New starts a node: its etcd member (or the client of an external
// cluster), the service key (created for a node's first start unless the
// cluster already has one), the CA (created by the first node), and this
// node's TLS certificate.
func New(ctx context.Context, cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("key service data directory: %w", err)
	}
	s := &Service{cfg: cfg, verifiers: map[string]verify.Verifier{verify.ModeKey: verify.KeyMode{}}, metrics: newMetrics()}
	for _, v := range cfg.Verifiers {
		s.verifiers[v.Mode()] = v
	}
	st, err := openStore(ctx, &s.cfg)
	if err != nil {
		return nil, err
	}
	s.st = st
	st.metrics = s.metrics
	// A member that just started or joined learns its leader first.
	if st.etcd != nil && !st.awaitLeader(ctx, time.Minute) {
		err := st.unavailable("start", errors.New("no leader elected within a minute"))
		st.close()
		return nil, err
	}
	if err := s.bootstrap(ctx); err != nil {
		st.close()
		return nil, err
	}
	return s, nil
}

// Close stops the node's etcd member.
func (s *Service) Close() { s.st.close() }

// Metrics returns the node's metrics.
func (s *Service) Metrics() *Metrics { return s.metrics }

// Config returns the node's validated configuration.
func (s *Service) Config() Config { return s.cfg }

func (s *Service) bootstrap(ctx context.Context) error {
	// The first node of a cluster makes the service key; every other node
	// must be given the same one (copied, or handed over by join).
	var check []byte
	found, _, err := s.st.getJSON(ctx, keyCheck, &check)
	if err != nil {
		return err
	}
	k, err := loadServiceKey(s.cfg.ServiceKeyFile, !found, s.cfg.HostTPM)
	if err != nil {
		return err
	}
	s.key = k
	if !found {
		_, err := s.st.txn(ctx, "record the service key check",
			[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(keyCheck), "=", 0)},
			[]clientv3.Op{clientv3.OpPut(keyCheck, mustJSON(k.check()))})
		if err != nil {
			return err
		}
		if _, _, err := s.st.getJSON(ctx, keyCheck, &check); err != nil {
			return err
		}
	}
	if subtle.ConstantTimeCompare(check, k.check()) != 1 {
		return &WrongServiceKeyError{Key: keyCheck, Path: k.path}
	}
	if err := s.ensureCA(ctx); err != nil {
		return err
	}
	s.tlsKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	if err := s.loadCA(ctx); err != nil {
		return err
	}
	_, err = s.st.txn(ctx, "register the node", nil,
		[]clientv3.Op{clientv3.OpPut(keyNodes+s.cfg.Name, mustJSON(nodeRecord{Name: s.cfg.Name, APIURL: s.cfg.APIURL}))})
	return err
}

func (s *Service) ensureCA(ctx context.Context) error {
	var rec caRecord
	found, _, err := s.st.getJSON(ctx, keyCA, &rec)
	if err != nil || found {
		return err
	}
	a, err := newAuthority()
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(a.key)
	if err != nil {
		return err
	}
	rec = caRecord{Cert: a.cert.Raw, SealedKey: s.key.seal(keyCA, der)}
	// Another node may win the race: then its CA is the one.
	_, err = s.st.txn(ctx, "create the service CA",
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(keyCA), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(keyCA, mustJSON(rec))})
	return err
}

// loadCA reads the CA from etcd, issues this node's TLS certificate under
// it, and writes ca.pem into the data directory for local clients.
func (s *Service) loadCA(ctx context.Context) error {
	var rec caRecord
	found, _, err := s.st.getJSON(ctx, keyCA, &rec)
	if err != nil {
		return err
	}
	if !found {
		return errdefs.New(errdefs.ErrFailedPrecondition, "the service CA is missing from etcd")
	}
	der, err := s.key.open(keyCA, rec.SealedKey)
	if err != nil {
		return err
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return fmt.Errorf("service CA key: %w", err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return fmt.Errorf("service CA key is %T", k)
	}
	a, err := parseAuthority(rec.Cert, ek)
	if err != nil {
		return err
	}
	if old := s.ca.Load(); old != nil && old.cert.Equal(a.cert) {
		return nil
	}
	cert, err := a.issueServer(s.cfg.Name, s.cfg.APIURL, &s.tlsKey.PublicKey)
	if err != nil {
		return err
	}
	s.ca.Store(a)
	s.server.Store(&tls.Certificate{Certificate: [][]byte{cert.Raw, a.cert.Raw}, PrivateKey: s.tlsKey, Leaf: cert})
	return atomicfile.Write(filepath.Join(s.cfg.DataDir, "ca.pem"), pemCert(a.cert.Raw), 0o644)
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// watchCA reloads the CA when it changes (a restore replaces it) until ctx
// ends.
func (s *Service) watchCA(ctx context.Context) {
	for ctx.Err() == nil {
		wch := s.st.cli.Watch(clientv3.WithRequireLeader(ctx), keyCA)
		for range wch {
			if err := s.loadCA(ctx); err != nil {
				s.cfg.Logger.Warn("reload the service CA", "err", err)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
			// The watch ends without a leader; try again, and catch up.
			if err := s.loadCA(ctx); err != nil && ctx.Err() == nil {
				s.cfg.Logger.Debug("reload the service CA", "err", err)
			}
		}
	}
}

// endpoints lists every node's API URL, this node's first.
func (s *Service) endpoints(ctx context.Context) []string {
	out := []string{s.cfg.APIURL}
	nodes, err := list[nodeRecord](ctx, s.st, keyNodes)
	if err != nil {
		return out
	}
	for _, n := range nodes {
		if !slices.Contains(out, n.APIURL) {
			out = append(out, n.APIURL)
		}
	}
	return out
}

// Issued is a client certificate with what a client needs to reach the
// service.
type Issued struct {
	Cert      *x509.Certificate
	CA        *x509.Certificate
	Endpoints []string
}

func (s *Service) issued(ctx context.Context, cert *x509.Certificate) *Issued {
	return &Issued{Cert: cert, CA: s.ca.Load().cert, Endpoints: s.endpoints(ctx)}
}

func (s *Service) checkToken(token []byte) error {
	if subtle.ConstantTimeCompare(token, InitToken(s.key.raw)) != 1 {
		return errdefs.New(errdefs.ErrPermissionDenied, "the init token does not match this key service's service key")
	}
	return nil
}

// Init creates the fleet guardian and the first admin's certificate. It
// is authorized by the init token and runs once.
func (s *Service) Init(ctx context.Context, token []byte, fleetName, adminName string, adminPub crypto.PublicKey) ([]byte, *Issued, error) {
	if err := s.checkToken(token); err != nil {
		return nil, nil, err
	}
	if fleetName == "" {
		fleetName = "fleet"
	}
	if adminName == "" {
		adminName = "admin"
	}
	g, err := guardian.New(fleetName, guardian.MLKEM768X25519)
	if err != nil {
		return nil, nil, err
	}
	certs, err := g.ExportCertificates()
	if err != nil {
		return nil, nil, err
	}
	priv, err := g.Marshal()
	if err != nil {
		return nil, nil, err
	}
	rec := fleetRecord{Name: g.Name(), Fingerprint: g.Fingerprint(), Certs: certs, Sealed: s.key.seal(keyFleet, priv)}
	resp, err := s.st.txn(ctx, "create the fleet guardian",
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(keyFleet), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(keyFleet, mustJSON(rec))})
	if err != nil {
		return nil, nil, err
	}
	if !resp.Succeeded {
		return nil, nil, errdefs.New(errdefs.ErrAlreadyExists, "the key service already has a fleet guardian").With(
			errdefs.Advise("ask an admin of the key service for a client certificate"))
	}
	cert, err := s.ca.Load().issueClient(adminName, RoleAdmin, adminPub)
	if err != nil {
		return nil, nil, err
	}
	if _, _, err := s.appendAudit(ctx, AuditRecord{Event: EventInit, Actor: adminName, Outcome: "ok", Detail: "fleet guardian " + g.String()}); err != nil {
		return nil, nil, err
	}
	return certs, s.issued(ctx, cert), nil
}

// FleetGuardian returns the fleet guardian (public) and its certificates.
func (s *Service) FleetGuardian(ctx context.Context) (*guardian.Guardian, []byte, error) {
	var rec fleetRecord
	found, _, err := s.st.getJSON(ctx, keyFleet, &rec)
	if err != nil {
		return nil, nil, err
	}
	if !found {
		return nil, nil, errdefs.New(errdefs.ErrFailedPrecondition, "the key service has no fleet guardian yet").With(
			errdefs.Do(errdefs.ActionKeyServiceInit).On("a key service node"))
	}
	g, err := guardian.ParseCertificates(rec.Certs)
	return g, rec.Certs, err
}

// fleetPrivate returns the fleet guardian with its private keys, cached
// while its etcd record does not change.
func (s *Service) fleetPrivate(ctx context.Context) (*guardian.Guardian, error) {
	var rec fleetRecord
	found, rev, err := s.st.getJSON(ctx, keyFleet, &rec)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, nil
	}
	s.fleetMu.Lock()
	defer s.fleetMu.Unlock()
	if s.fleet != nil && s.fleetRev == rev {
		return s.fleet, nil
	}
	priv, err := s.key.open(keyFleet, rec.Sealed)
	if err != nil {
		return nil, err
	}
	defer clear(priv)
	g, err := guardian.Parse(priv)
	if err != nil {
		return nil, fmt.Errorf("fleet guardian in etcd: %w", err)
	}
	s.fleet, s.fleetRev = g, rev
	return g, nil
}

// HostSpec is what an admin registers.
type HostSpec struct {
	Name     string
	Mode     string
	Groups   []string
	Guardian []byte // PEM certificates
	EK       []byte
	Policy   string
}

// AddHost registers a host and issues its client certificate (role host)
// for pub.
func (s *Service) AddHost(ctx context.Context, who Identity, h HostSpec, pub crypto.PublicKey) (*Issued, error) {
	if h.Name == "" {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "a host needs a name")
	}
	if _, ok := s.verifiers[h.Mode]; !ok {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "host %s: mode %q is not supported here (modes: %s)", h.Name, h.Mode, strings.Join(s.modes(), ", "))
	}
	if len(h.Guardian) == 0 {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "host %s: give its guardian's certificates", h.Name)
	}
	if _, err := guardian.ParseCertificates(h.Guardian); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "host %s: guardian certificates", h.Name)
	}
	if h.Mode == verify.ModeTPM && len(h.EK) == 0 {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "host %s: TPM mode needs the host TPM's EK", h.Name)
	}
	cert, err := s.ca.Load().issueClient(h.Name, RoleHost, pub)
	if err != nil {
		return nil, err
	}
	rec := HostRecord{Name: h.Name, Mode: h.Mode, Groups: h.Groups, Guardian: h.Guardian, EK: h.EK, Policy: h.Policy,
		Registered: time.Now().UTC(), ClientSerial: cert.SerialNumber.Text(16)}
	key := keyHosts + h.Name
	resp, err := s.st.txn(ctx, "register host "+h.Name,
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(key, mustJSON(rec))})
	if err != nil {
		return nil, err
	}
	if !resp.Succeeded {
		return nil, errdefs.New(errdefs.ErrAlreadyExists, "host %s is already registered", h.Name)
	}
	if _, _, err := s.appendAudit(ctx, AuditRecord{Event: EventRegister, Actor: who.Name, Host: h.Name, Outcome: "ok",
		Detail: fmt.Sprintf("mode %s, groups %s", h.Mode, strings.Join(h.Groups, ","))}); err != nil {
		return nil, err
	}
	return s.issued(ctx, cert), nil
}

func (s *Service) modes() []string {
	var m []string
	for k := range s.verifiers {
		m = append(m, k)
	}
	sort.Strings(m)
	return m
}

func (s *Service) host(ctx context.Context, name string) (*HostRecord, int64, error) {
	var h HostRecord
	found, rev, err := s.st.getJSON(ctx, keyHosts+name, &h)
	if err != nil {
		return nil, 0, err
	}
	if !found {
		return nil, 0, nil
	}
	return &h, rev, nil
}

// updateHost applies f to host name's record in a transaction on its
// revision, retrying when another node changed it meanwhile.
func (s *Service) updateHost(ctx context.Context, name string, f func(*HostRecord) error) (*HostRecord, error) {
	for {
		h, rev, err := s.host(ctx, name)
		if err != nil {
			return nil, err
		}
		if h == nil {
			return nil, errdefs.New(errdefs.ErrNotFound, "host %s is not registered", name)
		}
		if err := f(h); err != nil {
			return nil, err
		}
		key := keyHosts + name
		resp, err := s.st.txn(ctx, "update host "+name,
			[]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)},
			[]clientv3.Op{clientv3.OpPut(key, mustJSON(h))})
		if err != nil {
			return nil, err
		}
		if resp.Succeeded {
			return h, nil
		}
	}
}

// RemoveHost unregisters a host: its certificates stop working at once.
func (s *Service) RemoveHost(ctx context.Context, who Identity, name string) error {
	resp, err := s.st.txn(ctx, "remove host "+name, nil, []clientv3.Op{clientv3.OpDelete(keyHosts + name)})
	if err != nil {
		return err
	}
	if resp.Responses[0].GetResponseDeleteRange().Deleted == 0 {
		return errdefs.New(errdefs.ErrNotFound, "host %s is not registered", name)
	}
	_, _, err = s.appendAudit(ctx, AuditRecord{Event: EventRemove, Actor: who.Name, Host: name, Outcome: "ok"})
	return err
}

// RevokeHost refuses a host from its next request on; its health
// certificate is void.
func (s *Service) RevokeHost(ctx context.Context, who Identity, name string) error {
	if _, err := s.updateHost(ctx, name, func(h *HostRecord) error {
		h.Revoked, h.RevokedAt, h.HealthSerial = true, time.Now().UTC(), ""
		return nil
	}); err != nil {
		return err
	}
	_, _, err := s.appendAudit(ctx, AuditRecord{Event: EventRevoke, Actor: who.Name, Host: name, Outcome: "ok"})
	return err
}

// Hosts lists the registered hosts.
func (s *Service) Hosts(ctx context.Context) ([]HostRecord, error) {
	return list[HostRecord](ctx, s.st, keyHosts)
}

// SetPolicy stores an attestation policy.
func (s *Service) SetPolicy(ctx context.Context, who Identity, p verify.Policy) error {
	if p.Name == "" {
		return errdefs.New(errdefs.ErrInvalidArgument, "a policy needs a name")
	}
	if _, err := s.st.txn(ctx, "store policy "+p.Name, nil, []clientv3.Op{clientv3.OpPut(keyPolicies+p.Name, mustJSON(p))}); err != nil {
		return err
	}
	_, _, err := s.appendAudit(ctx, AuditRecord{Event: EventPolicy, Actor: who.Name, Outcome: "ok",
		Detail: fmt.Sprintf("attestation policy %s: %d classes, secure boot required %v", p.Name, len(p.Classes), p.RequireSecureBoot)})
	return err
}

// Policy returns the attestation policy name (verify.Policies).
func (s *Service) Policy(ctx context.Context, name string) (*verify.Policy, error) {
	var p verify.Policy
	found, _, err := s.st.getJSON(ctx, keyPolicies+name, &p)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, errdefs.New(errdefs.ErrNotFound, "no attestation policy %q", name)
	}
	return &p, nil
}

// Policies lists the attestation policies.
func (s *Service) Policies(ctx context.Context) ([]verify.Policy, error) {
	return list[verify.Policy](ctx, s.st, keyPolicies)
}

// SetVMPolicy stores (or with remove, deletes) which groups may run a TPM.
func (s *Service) SetVMPolicy(ctx context.Context, who Identity, p VMPolicy, remove bool) error {
	if p.TPM != "default" {
		id, err := uuid.Parse(p.TPM)
		if err != nil {
			return errdefs.Wrap(errdefs.ErrInvalidArgument, err, "VM policy: %q is neither a TPM UUID nor \"default\"", p.TPM)
		}
		p.TPM = id.String()
	}
	op := clientv3.OpPut(keyVMPolicies+p.TPM, mustJSON(p))
	detail := fmt.Sprintf("TPM %s may run in groups %s", p.TPM, strings.Join(p.Groups, ","))
	if remove {
		op, detail = clientv3.OpDelete(keyVMPolicies+p.TPM), fmt.Sprintf("TPM %s: policy removed", p.TPM)
	}
	if _, err := s.st.txn(ctx, "store the VM policy of "+p.TPM, nil, []clientv3.Op{op}); err != nil {
		return err
	}
	_, _, err := s.appendAudit(ctx, AuditRecord{Event: EventPolicy, Actor: who.Name, TPM: p.TPM, Outcome: "ok", Detail: detail})
	return err
}

// VMPolicies lists the VM policies.
func (s *Service) VMPolicies(ctx context.Context) ([]VMPolicy, error) {
	return list[VMPolicy](ctx, s.st, keyVMPolicies)
}

// IssueClient issues an admin's or a reviewer's certificate.
func (s *Service) IssueClient(ctx context.Context, who Identity, name string, role Role, pub crypto.PublicKey) (*Issued, error) {
	if role == RoleHost {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "a host's certificate comes with its registration (host add)")
	}
	cert, err := s.ca.Load().issueClient(name, role, pub)
	if err != nil {
		return nil, err
	}
	if _, _, err := s.appendAudit(ctx, AuditRecord{Event: EventClient, Actor: who.Name, Outcome: "ok", Detail: fmt.Sprintf("%s certificate for %s", role, name)}); err != nil {
		return nil, err
	}
	return s.issued(ctx, cert), nil
}

// AddMember adds an etcd member for a new node and returns what the node
// needs to start: the initial cluster and the service key.
func (s *Service) AddMember(ctx context.Context, who Identity, name string, peerURLs []string) (string, []byte, error) {
	if s.st.etcd == nil {
		return "", nil, errdefs.New(errdefs.ErrFailedPrecondition, "this key service uses an external etcd: add members to that cluster, and start the node with the same endpoints")
	}
	// Audited first: until the new member starts, a cluster of two has
	// no quorum.
	if _, _, err := s.appendAudit(ctx, AuditRecord{Event: EventMember, Actor: who.Name, Outcome: "ok", Detail: fmt.Sprintf("member %s at %s", name, strings.Join(peerURLs, ","))}); err != nil {
		return "", nil, err
	}
	var resp *clientv3.MemberAddResponse
	err := s.st.op(ctx, "add member "+name, func(ctx context.Context) error {
		var err error
		resp, err = s.st.cli.MemberAdd(ctx, peerURLs)
		return err
	})
	if err != nil {
		return "", nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "add etcd member %s", name)
	}
	var parts []string
	for _, m := range resp.Members {
		n := m.Name
		if m.ID == resp.Member.ID {
			n = name
		}
		for _, u := range m.PeerURLs {
			parts = append(parts, n+"="+u)
		}
	}
	return strings.Join(parts, ","), append([]byte(nil), s.key.raw...), nil
}

// Audit returns the records after seq after and, with verify, checks the
// whole chain.
func (s *Service) Audit(ctx context.Context, after uint64, check bool) ([]AuditRecord, *AuditVerdict, error) {
	recs, err := s.auditRecords(ctx, after)
	if err != nil {
		return nil, nil, err
	}
	if !check {
		return recs, nil, nil
	}
	v, err := s.verifyAudit(ctx)
	return recs, &v, err
}

// attestSession is what the service remembers of a challenge, sealed in
// the session the host sends back.
type attestSession struct {
	Host      string            `json:"host"`
	Mode      string            `json:"mode"`
	Expires   time.Time         `json:"expires"`
	Challenge *verify.Challenge `json:"challenge"`
}

const sessionLifetime = 5 * time.Minute

func (h *HostRecord) verifyHost() *verify.Host {
	return &verify.Host{Name: h.Name, Mode: h.Mode, Groups: h.Groups, Guardian: h.Guardian, EK: h.EK, Policy: h.Policy}
}

// callerHost returns the registered, unrevoked host the caller is.
func (s *Service) callerHost(ctx context.Context, who Identity, tpm string) (*HostRecord, error) {
	h, _, err := s.host(ctx, who.Name)
	if err != nil {
		return nil, err
	}
	if h == nil {
		return nil, &DenialError{Host: who.Name, TPM: tpm, Reason: DenyNotRegistered}
	}
	if h.ClientSerial != "" && who.Serial != h.ClientSerial {
		// A certificate of a host of that name removed before.
		return nil, &DenialError{Host: who.Name, TPM: tpm, Reason: DenyNotRegistered, Detail: "this client certificate was issued to an earlier registration of the host"}
	}
	if h.Revoked {
		return nil, &DenialError{Host: who.Name, TPM: tpm, Reason: DenyRevoked}
	}
	return h, nil
}

// BeginAttestation returns the challenge for the calling host and its
// sealed session.
func (s *Service) BeginAttestation(ctx context.Context, who Identity, b *verify.Begin) (session []byte, c *verify.Challenge, err error) {
	h, err := s.callerHost(ctx, who, "")
	if err != nil {
		s.deny(ctx, err, "")
		return nil, nil, err
	}
	v, ok := s.verifiers[h.Mode]
	if !ok {
		return nil, nil, errdefs.New(errdefs.ErrFailedPrecondition, "host %s is registered for %s mode, which this node does not support", h.Name, h.Mode)
	}
	c, err = v.Challenge(ctx, h.verifyHost(), b)
	if err != nil {
		s.attestFailed(ctx, h, err)
		return nil, nil, err
	}
	plain, err := json.Marshal(attestSession{Host: h.Name, Mode: h.Mode, Expires: time.Now().Add(sessionLifetime), Challenge: c})
	if err != nil {
		return nil, nil, err
	}
	nonce := make([]byte, s.key.session.NonceSize())
	rand.Read(nonce)
	return s.key.session.Seal(nonce, nonce, plain, []byte(h.Name)), c, nil
}

// CompleteAttestation checks the host's evidence and issues its health
// certificate.
func (s *Service) CompleteAttestation(ctx context.Context, who Identity, session []byte, e *verify.Evidence) (*x509.Certificate, error) {
	h, err := s.callerHost(ctx, who, "")
	if err != nil {
		s.deny(ctx, err, "")
		return nil, err
	}
	var sess attestSession
	n := s.key.session.NonceSize()
	plain, err := func() ([]byte, error) {
		if len(session) < n {
			return nil, errors.New("truncated")
		}
		return s.key.session.Open(nil, session[:n], session[n:], []byte(h.Name))
	}()
	if err == nil {
		err = json.Unmarshal(plain, &sess)
	}
	if err != nil || sess.Host != h.Name || time.Now().After(sess.Expires) || sess.Mode != h.Mode {
		f := verify.Fail(h.verifyHost(), verify.ReasonSessionExpired, "begin the attestation again")
		s.attestFailed(ctx, h, f)
		return nil, f
	}
	verdict, err := s.verifiers[h.Mode].Verify(ctx, h.verifyHost(), sess.Challenge, e, s)
	if err != nil {
		s.attestFailed(ctx, h, err)
		return nil, err
	}
	g, err := guardian.ParseCertificates(h.Guardian)
	if err != nil {
		return nil, err
	}
	cert, err := s.ca.Load().issueHealth(h.Name, g.SigningCertificate().PublicKey, s.cfg.HealthLifetime)
	if err != nil {
		return nil, err
	}
	if _, err := s.updateHost(ctx, h.Name, func(r *HostRecord) error {
		if r.Revoked {
			return &DenialError{Host: h.Name, Reason: DenyRevoked}
		}
		r.Attested, r.HealthSerial, r.HealthNotAfter, r.LastFailure = time.Now().UTC(), cert.SerialNumber.Text(16), cert.NotAfter, ""
		return nil
	}); err != nil {
		return nil, err
	}
	detail := fmt.Sprintf("mode %s; health certificate until %s", h.Mode, cert.NotAfter.Format(time.RFC3339))
	if verdict.Policy != "" {
		detail += fmt.Sprintf("; policy %s class %s", verdict.Policy, verdict.Class)
	}
	if _, _, err := s.appendAudit(ctx, AuditRecord{Event: EventAttest, Actor: who.Name, Host: h.Name, Outcome: "ok", Detail: detail}); err != nil {
		return nil, err
	}
	s.metrics.attestation(h.Mode, "pass")
	return cert, nil
}

// attestFailed records a failed attestation in the host's record, the
// audit log and the metrics.
func (s *Service) attestFailed(ctx context.Context, h *HostRecord, err error) {
	reason := "error"
	var f *verify.Failure
	if errors.As(err, &f) {
		reason = string(f.Reason)
	}
	s.metrics.attestation(h.Mode, "fail")
	s.updateHost(ctx, h.Name, func(r *HostRecord) error { r.LastFailure = err.Error(); return nil })
	if _, _, aerr := s.appendAudit(ctx, AuditRecord{Event: EventAttest, Actor: h.Name, Host: h.Name, Outcome: "denied", Reason: reason, Detail: err.Error()}); aerr != nil {
		s.cfg.Logger.Warn("audit a failed attestation", "host", h.Name, "err", aerr)
	}
}

// deny records a refused request in the audit log and the metrics.
func (s *Service) deny(ctx context.Context, err error, requestID string) {
	var d *DenialError
	if !errors.As(err, &d) {
		return
	}
	s.metrics.denial(string(d.Reason))
	if _, _, aerr := s.appendAudit(ctx, AuditRecord{Event: EventDeny, Actor: d.Host, Host: d.Host, TPM: d.TPM, Outcome: "denied",
		Reason: string(d.Reason), RequestID: requestID, Detail: d.Error()}); aerr != nil {
		s.cfg.Logger.Warn("audit a denial", "host", d.Host, "err", aerr)
	}
}

// Release is a released data key, sealed to the host's one-time key.
type Release struct {
	Sealed   []byte
	TPM      uuid.UUID
	Fleet    string
	AuditSeq uint64
}

// ReleaseKey opens the fleet row of protector for the calling host, after
// checking its health certificate, that it is not revoked, and the VM's
// policy, and seals the data key to the host's one-time HPKE key. Each
// release and each denial is audited once per request ID.
func (s *Service) ReleaseKey(ctx context.Context, who Identity, protector, health []byte, recipient hpke.PublicKey, requestID string) (*Release, error) {
	start := time.Now()
	rel, err := s.releaseKey(ctx, who, protector, health, recipient, requestID)
	if err != nil {
		s.deny(ctx, err, requestID)
		return nil, err
	}
	s.metrics.release(time.Since(start))
	return rel, nil
}

func (s *Service) releaseKey(ctx context.Context, who Identity, protector, health []byte, recipient hpke.PublicKey, requestID string) (*Release, error) {
	p, err := guardian.ParseProtector(protector)
	if err != nil {
		return nil, &DenialError{Host: who.Name, Reason: DenyBadProtector, Detail: err.Error()}
	}
	tpm := p.TPM().String()
	h, err := s.callerHost(ctx, who, tpm)
	if err != nil {
		return nil, err
	}
	if err := s.checkHealth(h, health, tpm); err != nil {
		return nil, err
	}
	var vp VMPolicy
	found, _, err := s.st.getJSON(ctx, keyVMPolicies+tpm, &vp)
	if err != nil {
		return nil, err
	}
	if !found {
		if _, _, err := s.st.getJSON(ctx, keyVMPolicies+"default", &vp); err != nil {
			return nil, err
		}
	}
	if len(vp.Groups) > 0 && !slices.ContainsFunc(h.Groups, func(g string) bool { return slices.Contains(vp.Groups, g) }) {
		return nil, &DenialError{Host: h.Name, TPM: tpm, Reason: DenyNotInGroup, Groups: vp.Groups}
	}
	fleet, err := s.fleetPrivate(ctx)
	if err != nil {
		return nil, err
	}
	if fleet == nil {
		return nil, &DenialError{Host: h.Name, TPM: tpm, Reason: DenyNotInitialized}
	}
	dek, _, err := p.Open([]*guardian.Guardian{fleet})
	if err != nil {
		var ng *guardian.NoGuardianError
		if errors.As(err, &ng) {
			return nil, &DenialError{Host: h.Name, TPM: tpm, Reason: DenyNoFleetRow, Detail: "fleet guardian " + fleet.String()}
		}
		return nil, err
	}
	defer clear(dek)
	sealed, err := hpke.Seal(recipient, hpke.HKDFSHA256(), hpke.AES256GCM(), ReleaseInfo(p.TPM(), requestID), dek)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "seal the data key to the host's one-time key")
	}
	seq, _, err := s.appendAudit(ctx, AuditRecord{Event: EventRelease, Actor: h.Name, Host: h.Name, TPM: tpm, Outcome: "ok", RequestID: requestID,
		Detail: fmt.Sprintf("protector version %d, fleet guardian %s", p.Version(), fleet.Fingerprint()[:16])})
	if err != nil {
		return nil, err
	}
	return &Release{Sealed: sealed, TPM: p.TPM(), Fleet: fleet.Fingerprint(), AuditSeq: seq}, nil
}

// ReleaseInfo is the HPKE info of a released key: it binds the sealed key
// to the TPM and the request.
func ReleaseInfo(tpm uuid.UUID, requestID string) []byte {
	b := append([]byte("vtpm keyservice release v1"), 0)
	b = append(b, tpm[:]...)
	return append(b, requestID...)
}

// checkHealth verifies a host's health certificate: issued by this
// service's CA for this host, unexpired, and the host's current one.
func (s *Service) checkHealth(h *HostRecord, der []byte, tpm string) error {
	if len(der) == 0 || h.HealthSerial == "" {
		if h.LastFailure != "" {
			// Say why: its last attestation failed (PCR 7 differs from …).
			return &DenialError{Host: h.Name, TPM: tpm, Reason: DenyNoHealth, Detail: "last attestation: " + h.LastFailure}
		}
		return &DenialError{Host: h.Name, TPM: tpm, Reason: DenyNoHealth}
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return &DenialError{Host: h.Name, TPM: tpm, Reason: DenyHealthInvalid, Detail: err.Error()}
	}
	ca := s.ca.Load()
	if err := c.CheckSignatureFrom(ca.cert); err != nil || c.Subject.CommonName != h.Name || !slices.Contains(c.Subject.OrganizationalUnit, healthUnit) {
		return &DenialError{Host: h.Name, TPM: tpm, Reason: DenyHealthInvalid, Detail: "not issued by this key service for this host"}
	}
	if time.Now().After(c.NotAfter) {
		return &DenialError{Host: h.Name, TPM: tpm, Reason: DenyHealthExpired, NotAfter: c.NotAfter}
	}
	if c.SerialNumber.Text(16) != h.HealthSerial {
		return &DenialError{Host: h.Name, TPM: tpm, Reason: DenyHealthInvalid, Detail: "superseded by a later attestation"}
	}
	return nil
}

// ServiceKeyStorage says where this node keeps its service key, and
// whether that is weaker than a key sealed to a host TPM.
func (s *Service) ServiceKeyStorage() (string, bool) {
	return s.key.storage, s.key.weaker
}
