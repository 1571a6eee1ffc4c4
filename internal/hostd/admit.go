package hostd

import (
	"context"
	"crypto/x509"
	"net/http"

	"connectrpc.com/connect"

	"vtpm/internal/apierr"
	"vtpm/internal/errdefs"
)

type peerKey struct{}

// PeerFrom returns the name of the trusted peer making the call, "" for a
// call on the local API.
func PeerFrom(ctx context.Context) string {
	name, _ := ctx.Value(peerKey{}).(string)
	return name
}

// admit lets a call through only from a peer trusted now: the handshake
// admitted the connection, but a peer untrusted since then may still hold
// it open.
func (s *Server) admit(next http.Handler) http.Handler {
	w := connect.NewErrorWriter()
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		var p *Peer
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			raw := make([][]byte, len(r.TLS.PeerCertificates))
			for i, c := range r.TLS.PeerCertificates {
				raw[i] = c.Raw
			}
			if ci, err := parseChain(raw, x509.ExtKeyUsageClientAuth); err == nil {
				p = issuer(s.currentPeers(), ci)
			}
		}
		if p == nil {
			err := errdefs.New(errdefs.ErrPermissionDenied, "host %s does not trust the calling host: its certificate is issued by no guardian of a host trusted here", s.opts.Name).
				With(errdefs.Do(errdefs.ActionHostTrust).WithNote("if it should be, trust the calling host there").On("on host " + s.opts.Name))
			w.Write(rw, r, apierr.ToConnect(err, s.opts.Name))
			return
		}
		next.ServeHTTP(rw, r.WithContext(context.WithValue(r.Context(), peerKey{}, p.Name)))
	})
}
