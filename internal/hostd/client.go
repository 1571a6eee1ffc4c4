package hostd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/errdefs"
	"vtpm/internal/hostsvc"
)

// LocalClient reaches this host's host service on its local API socket.
type LocalClient struct {
	Host  hostv1connect.HostServiceClient
	Peers hostv1connect.PeerServiceClient
	// Socket is the socket it dials.
	Socket string
	// HTTP and Base reach the local API for clients of other services
	// (NewXServiceClient(HTTP, Base)).
	HTTP *http.Client
	Base string
}

// DialLocal returns a client of the local API at socket (default
// APISocketPath()). It connects lazily; a call to a service that does
// not answer fails with an error saying how to start it (ErrUnavailable).
func DialLocal(socket string) *LocalClient {
	if socket == "" {
		socket = APISocketPath()
	}
	tr := &http.Transport{Protocols: h2c(), DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return dialLocal(ctx, socket)
	}}
	tr.Protocols.SetHTTP1(false)
	c := &http.Client{Transport: tr}
	const base = "http://localhost"
	return &LocalClient{Host: hostv1connect.NewHostServiceClient(c, base), Peers: hostv1connect.NewPeerServiceClient(c, base), Socket: socket, HTTP: c, Base: base}
}

// dialLocal dials the API socket. When nothing listens there but the key
// socket is socket-activated, one connection to that starts the service,
// and the API socket is tried again for a few seconds.
func dialLocal(ctx context.Context, socket string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err == nil {
		return c, nil
	}
	if k, kerr := d.DialContext(ctx, "unix", hostsvc.SocketPath()); kerr == nil {
		k.Close()
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
			if c, err2 := d.DialContext(ctx, "unix", socket); err2 == nil {
				return c, nil
			}
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil, &UnreachableError{Socket: socket, Err: err}
}

// UnreachableError reports that the local host service does not answer.
type UnreachableError struct {
	Socket string
	Err    error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("cannot reach the host service at %s (%v); is it running, and are you root?", e.Socket, e.Err)
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// Is makes the error match errdefs.ErrUnavailable.
func (e *UnreachableError) Is(target error) bool { return target == errdefs.ErrUnavailable }

// Remedies: start the service.
func (e *UnreachableError) Remedies() []errdefs.Remedy {
	serve := errdefs.Do(errdefs.ActionHostServe)
	// The key socket of the service whose API socket this is, when known.
	if keys := hostsvc.SocketPath(); APISocketBeside(keys) == e.Socket {
		serve = errdefs.Do(errdefs.ActionHostServe, "socket", keys)
	}
	return []errdefs.Remedy{
		errdefs.Do(errdefs.ActionHostServiceStart).WithNote("start it"),
		serve.WithNote("or run it in the foreground"),
	}
}

// peerHTTPClient is an HTTP/2 client of peer p over TLS, pinned to p's
// guardian, and p's base URL. Its connections are its own: close them
// with CloseIdleConnections.
func (s *Server) peerHTTPClient(p *Peer) (*http.Client, string, error) {
	if !s.hasTLS {
		return nil, "", ErrNoTLS
	}
	tr := &http.Transport{
		TLSClientConfig:     clientTLS(s.certificate, p),
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
	}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP2(true)
	return &http.Client{Transport: tr}, "https://" + p.Address, nil
}

// PeerClient returns an HTTP/2 client of trusted peer name's API over
// TLS, pinned to its guardian, and the API's base URL, for a Connect
// client of any of its services (NewXServiceClient(c, base)). Pass a
// failed call's error through PeerError.
func (s *Server) PeerClient(name string) (*http.Client, string, error) {
	p, err := findPeer(s.currentPeers(), name)
	if err != nil {
		return nil, "", err
	}
	return s.peerHTTPClient(p)
}

// remoteRefusal reports whether err is the peer refusing this host's
// certificate in the TLS handshake (a TLS alert it sent).
func remoteRefusal(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "remote error"
}

// ErrNoTLS is returned for calls to peers when the service has no TLS
// listener, hence no certificate.
var ErrNoTLS = errdefs.New(errdefs.ErrFailedPrecondition, "this host's service has no TLS API (--listen), so it has no certificate to call its peers with").
	With(errdefs.Do(errdefs.ActionHostServeListen).WithNote("serve it"))
