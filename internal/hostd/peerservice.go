package hostd

import (
	"context"
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
	info, _, err := ps.s.callInfo(ctx, p)
	if err != nil {
		return nil, apierr.ToConnect(err, ps.s.opts.Name)
	}
	return connect.NewResponse(info), nil
}

func (p *Peer) proto() *hostv1.Peer {
	return &hostv1.Peer{Name: p.Name, Address: p.Address, GuardianName: p.g.Name(), GuardianFingerprint: p.g.Fingerprint()}
}

// Trust admits the host name at address whose guardian's public
// certificates are certs, and trusts that guardian as an owner of key
// protectors unless it is trusted or held already.
func (s *Server) Trust(name, address string, certs []byte) (*Peer, error) {
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
// trusted before, with `guardian trust`, stays trusted).
func (s *Server) Untrust(name string) (*Peer, error) {
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

// callInfo asks peer p for its GetInfo. It also reports whether p's
// certificate was checked and trusted (the TLS handshake got that far).
func (s *Server) callInfo(ctx context.Context, p *Peer) (*hostv1.GetInfoResponse, bool, error) {
	if !s.hasTLS {
		return nil, false, ErrNoTLS
	}
	var mu sync.Mutex
	var checked bool
	var verr error
	c, tr := s.peerClient(p, func(err error) {
		mu.Lock()
		checked, verr = true, err
		mu.Unlock()
	})
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	rsp, err := c.GetInfo(ctx, connect.NewRequest(&hostv1.GetInfoRequest{}))
	mu.Lock()
	defer mu.Unlock()
	switch {
	case err == nil:
		return rsp.Msg, true, nil
	case verr != nil:
		var changed *CertChangedError
		if errors.As(verr, &changed) {
			return nil, false, changed
		}
		return nil, false, errdefs.Wrap(errdefs.ErrPermissionDenied, verr, "host %s (%s) presented a certificate that does not verify", p.Name, p.Address)
	case checked && remoteRefusal(err):
		return nil, true, &RefusedError{Peer: p.Name, Host: s.opts.Name, Address: s.advertised()}
	case checked:
		return nil, true, fmt.Errorf("host %s: %w", p.Name, apierr.FromConnect(err, "on host "+p.Name))
	}
	return nil, false, errdefs.Wrap(errdefs.ErrUnavailable, unwrapConnect(err), "host %s at %s does not answer", p.Name, p.Address)
}

// probe fills st with what calling p shows.
func (s *Server) probe(ctx context.Context, p *Peer, st *hostv1.PeerStatus) {
	info, trusted, err := s.callInfo(ctx, p)
	if err == nil {
		st.Reachable, st.CertStatus, st.Version = true, hostv1.CertStatus_CERT_STATUS_TRUSTED, info.GetVersion()
		return
	}
	st.Error = err.Error()
	var changed *CertChangedError
	switch {
	case errors.As(err, &changed):
		st.Reachable, st.CertStatus, st.PresentedGuardianFingerprint = true, hostv1.CertStatus_CERT_STATUS_CHANGED, changed.Presented
	case trusted:
		st.Reachable, st.CertStatus = true, hostv1.CertStatus_CERT_STATUS_TRUSTED
	}
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
