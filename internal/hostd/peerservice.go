package hostd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/errdefs"
)

// callTimeout bounds a call to a peer on the CLI's behalf.
const callTimeout = 10 * time.Second

// peerService implements PeerService, on the local API only.
type peerService struct {
	hostv1connect.UnimplementedPeerServiceHandler
	s *Server
}

var _ hostv1connect.PeerServiceHandler = (*peerService)(nil)

func (ps *peerService) TrustPeer(ctx context.Context, req *connect.Request[hostv1.TrustPeerRequest]) (*connect.Response[hostv1.TrustPeerResponse], error) {
	p, err := ps.s.Trust(req.Msg.GetName(), req.Msg.GetAddress(), req.Msg.GetCertificates())
	if err != nil {
		return nil, apierr.ToConnect(err, ps.s.opts.Name)
	}
	return connect.NewResponse(&hostv1.TrustPeerResponse{Peer: p.proto(), OwnerTrusted: p.OwnerTrusted}), nil
}

func (ps *peerService) UntrustPeer(ctx context.Context, req *connect.Request[hostv1.UntrustPeerRequest]) (*connect.Response[hostv1.UntrustPeerResponse], error) {
	p, err := ps.s.Untrust(req.Msg.GetName())
	if err != nil {
		return nil, apierr.ToConnect(err, ps.s.opts.Name)
	}
	return connect.NewResponse(&hostv1.UntrustPeerResponse{Peer: p.proto(), OwnerUntrusted: p.OwnerTrusted}), nil
}

func (ps *peerService) ListPeers(ctx context.Context, req *connect.Request[hostv1.ListPeersRequest]) (*connect.Response[hostv1.ListPeersResponse], error) {
	peers := ps.s.currentPeers()
	out := make([]*hostv1.PeerStatus, len(peers))
	var wg sync.WaitGroup
	for i, p := range peers {
		out[i] = &hostv1.PeerStatus{Peer: p.proto(), CertStatus: hostv1.CertStatus_CERT_STATUS_UNKNOWN}
		if req.Msg.GetOffline() {
			continue
		}
		wg.Go(func() { ps.s.probe(ctx, p, out[i]) })
	}
	wg.Wait()
	return connect.NewResponse(&hostv1.ListPeersResponse{Peers: out}), nil
}

func (ps *peerService) PeerInfo(ctx context.Context, req *connect.Request[hostv1.PeerInfoRequest]) (*connect.Response[hostv1.GetInfoResponse], error) {
	p, err := findPeer(ps.s.currentPeers(), req.Msg.GetName())
	if err != nil {
		return nil, apierr.ToConnect(err, ps.s.opts.Name)
	}
	info, err := ps.s.callInfo(ctx, p)
	if err != nil {
		return nil, apierr.ToConnect(err, ps.s.opts.Name)
	}
	return connect.NewResponse(info), nil
}

func (p *Peer) proto() *hostv1.Peer {
	return &hostv1.Peer{Name: p.Name, Address: p.Address, GuardianName: p.g.Name(), GuardianFingerprint: p.g.Fingerprint()}
}

// errNotRunning refuses a change to a server that is not running.
var errNotRunning = errdefs.New(errdefs.ErrFailedPrecondition, "the host service is not running")

// Trust admits the host name at address whose guardian's public
// certificates are certs, and trusts that guardian as an owner of key
// protectors unless it is trusted or held already. The server must be
// running (Run).
func (s *Server) Trust(name, address string, certs []byte) (*Peer, error) {
	if s.broker == nil || s.local == nil {
		return nil, errNotRunning
	}
	p, err := NewPeer(name, address, certs)
	if err != nil {
		return nil, err
	}
	if p.g.Equal(s.local) {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "the certificates given for %s are this host's own guardian's (%s)", name, s.local)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, q := range s.peers {
		if q.Name == name {
			return nil, errdefs.New(errdefs.ErrAlreadyExists, "this host trusts a host %s already (guardian %s)", name, q.g).
				With(errdefs.Do(errdefs.ActionHostUntrust, "name", name).WithNote("to replace it, untrust it first"))
		}
		if q.g.Equal(p.g) {
			return nil, errdefs.New(errdefs.ErrAlreadyExists, "guardian %s is trusted already, as host %s", p.g, q.Name).
				With(errdefs.Do(errdefs.ActionHostUntrust, "name", q.Name).WithNote("to rename it, untrust it first"))
		}
	}
	added, err := s.broker.Trust(p.g)
	if err != nil && !errors.Is(err, errdefs.ErrAlreadyExists) {
		return nil, err
	}
	p.OwnerTrusted = added
	peers := append(slices.Clone(s.peers), p)
	if err := writePeers(s.opts.DataRoot, peers); err != nil {
		if added {
			s.broker.Untrust(p.g.Fingerprint())
		}
		return nil, err
	}
	s.peers = peers
	s.log.Info("trusting a host", "name", name, "address", address, "guardian", p.g.Name(), "fingerprint", p.g.Fingerprint(), "owner_trusted", added)
	return p, nil
}

// Untrust withdraws the admission of peer name, and the trust in its
// guardian as an owner when trusting the peer had added it (an owner
// trusted on its own before, keybroker.Trust, stays trusted). The server must
// be running (Run).
func (s *Server) Untrust(name string) (*Peer, error) {
	if s.broker == nil {
		return nil, errNotRunning
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := findPeer(s.peers, name)
	if err != nil {
		return nil, err
	}
	peers := slices.DeleteFunc(slices.Clone(s.peers), func(q *Peer) bool { return q == p })
	if err := writePeers(s.opts.DataRoot, peers); err != nil {
		return nil, err
	}
	s.peers = peers
	if p.OwnerTrusted {
		if _, err := s.broker.Untrust(p.g.Fingerprint()); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return p, fmt.Errorf("host %s is no longer trusted, but its guardian still is as an owner: %w", name, err)
		}
	}
	s.log.Info("no longer trusting a host", "name", name, "fingerprint", p.g.Fingerprint(), "owner_untrusted", p.OwnerTrusted)
	return p, nil
}

// callInfo asks peer p for its GetInfo.
func (s *Server) callInfo(ctx context.Context, p *Peer) (*hostv1.GetInfoResponse, error) {
	c, base, err := s.peerHTTPClient(p)
	if err != nil {
		return nil, err
	}
	defer c.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	rsp, err := hostv1connect.NewHostServiceClient(c, base).GetInfo(ctx, connect.NewRequest(&hostv1.GetInfoRequest{}))
	if err != nil {
		return nil, s.PeerError(p.Name, err)
	}
	return rsp.Msg, nil
}

// probe fills st with what calling p shows.
func (s *Server) probe(ctx context.Context, p *Peer, st *hostv1.PeerStatus) {
	info, err := s.callInfo(ctx, p)
	if err == nil {
		st.Reachable, st.CertStatus, st.Version = true, hostv1.CertStatus_CERT_STATUS_TRUSTED, info.GetVersion()
		return
	}
	st.Error = err.Error()
	var changed *CertChangedError
	var refused *RefusedError
	var answered *apierr.Error
	switch {
	case errors.As(err, &changed):
		st.Reachable, st.CertStatus, st.PresentedGuardianFingerprint = true, hostv1.CertStatus_CERT_STATUS_CHANGED, changed.Presented
	case errors.As(err, &refused), errors.As(err, &answered):
		// Its certificate was checked before it refused, or answered.
		st.Reachable, st.CertStatus = true, hostv1.CertStatus_CERT_STATUS_TRUSTED
	}
}

// PeerError is the error of a failed call to peer name, as data: its
// certificate changed (*CertChangedError), it refused this host in the
// handshake (*RefusedError), it answered with an error (an *apierr.Error
// whose remedies run "on host NAME"), or it did not answer
// (errdefs.ErrUnavailable).
func (s *Server) PeerError(name string, err error) error {
	var changed *CertChangedError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &changed):
		return changed
	case remoteRefusal(err):
		return &RefusedError{Peer: name, Host: s.opts.Name, Address: s.advertised()}
	case apierr.Detailed(err):
		return fmt.Errorf("host %s: %w", name, apierr.FromConnect(err, "on host "+name))
	}
	p, perr := findPeer(s.currentPeers(), name)
	if perr != nil {
		return errdefs.Wrap(errdefs.ErrUnavailable, unwrapConnect(err), "host %s does not answer", name)
	}
	// A peer that refuses this host's certificate sends its alert after
	// this side's handshake is done; a request already on its way then
	// meets a reset connection, and the alert is lost. A handshake that
	// sends nothing after it reads the verdict.
	if diag := s.diagnose(p); diag != nil {
		return diag
	}
	return errdefs.Wrap(errdefs.ErrUnavailable, unwrapConnect(err), "host %s at %s does not answer", name, p.Address)
}

// diagnose connects to p, completes a TLS handshake and reads without
// writing: a peer that admits this host speaks first (HTTP/2's settings),
// one that refuses it sends an alert. It returns the refusal, a changed
// certificate, or nil when it learns nothing.
func (s *Server) diagnose(p *Peer) error {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: callTimeout}, Config: clientTLS(s.certificate, p)}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", p.Address)
	var changed *CertChangedError
	if errors.As(err, &changed) {
		return changed
	}
	if err != nil {
		return nil
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(callTimeout))
	if _, err := c.Read(make([]byte, 1)); remoteRefusal(err) {
		return &RefusedError{Peer: p.Name, Host: s.opts.Name, Address: s.advertised()}
	}
	return nil
}

// advertised is this host's API address as peers would dial it, "" when
// it listens on every address (the user knows which one peers reach).
func (s *Server) advertised() string {
	host, _, err := net.SplitHostPort(s.opts.Listen)
	if err != nil || host == "" || net.ParseIP(host).IsUnspecified() {
		return ""
	}
	return s.opts.Listen
}

// unwrapConnect is the cause of a Connect client's transport error.
func unwrapConnect(err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Unwrap() != nil {
		return ce.Unwrap()
	}
	return err
}

// RefusedError reports a peer that refused this host's certificate in the
// TLS handshake: it does not trust this host (or no longer).
type RefusedError struct {
	Peer    string // the peer that refused
	Host    string // this host's name
	Address string // this host's API address, "" when not known
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("host %s refused this host's certificate in the TLS handshake: it does not trust host %s", e.Peer, e.Host)
}

// Is makes the error match errdefs.ErrPermissionDenied.
func (e *RefusedError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

// Remedies: export this host's certificates, have the peer trust them.
func (e *RefusedError) Remedies() []errdefs.Remedy {
	trust := errdefs.Do(errdefs.ActionHostTrust, "name", e.Host, "certs", e.Host+".pem")
	if e.Address != "" {
		trust.Args["address"] = e.Address
	}
	return []errdefs.Remedy{
		errdefs.Do(errdefs.ActionGuardianExportCerts, "file", e.Host+".pem").WithNote("export this host's certificates"),
		trust.WithNote("and trust them there").On("on host " + e.Peer),
	}
}
