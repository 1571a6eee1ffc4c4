package keyservice

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"

	"vtpm/api/vtpm/keyservice/v1/keyservicev1connect"
	"vtpm/internal/errdefs"
)

// Handler returns the node's API: Connect (and gRPC, gRPC-Web) on one
// http.Handler, the caller's identity taken from its verified client
// certificate.
func (s *Service) Handler() http.Handler {
	path, h := keyservicev1connect.NewKeyServiceHandler(&api{s: s}, connect.WithInterceptors(s.timing()))
	mux := http.NewServeMux()
	mux.Handle(path, h)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
			if id, ok := identityOf(r.TLS.VerifiedChains[0][0]); ok {
				ctx = withIdentity(ctx, &id)
			}
		}
		mux.ServeHTTP(w, r.WithContext(ctx))
	})
}

// timing observes every call's latency.
func (s *Service) timing() connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			start := time.Now()
			resp, err := next(ctx, req)
			proc := req.Spec().Procedure
			s.metrics.observe(proc[strings.LastIndexByte(proc, '/')+1:], time.Since(start))
			return resp, err
		}
	}
}

// TLSConfig is the API's TLS: 1.3 only, this node's certificate under the
// service CA, client certificates verified against the current CA (asked
// for, not required: Init and Restore run before any exists, and every
// other call checks the role).
func (s *Service) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{*s.server.Load()},
				ClientAuth:   tls.VerifyClientCertIfGiven,
				ClientCAs:    s.ca.Load().pool,
				NextProtos:   []string{"h2", "http/1.1"},
			}, nil
		},
	}
}

// Serve answers the API on ln (and metrics on MetricsListen) until ctx
// ends, then shuts down gracefully.
func (s *Service) Serve(ctx context.Context, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go s.watchCA(ctx)
	go s.watchHealth(ctx)
	srv := &http.Server{
		Handler:           s.Handler(),
		TLSConfig:         s.TLSConfig(),
		ReadHeaderTimeout: 10 * time.Second,
	}
	errc := make(chan error, 2)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	var msrv *http.Server
	if s.cfg.MetricsListen != "" {
		mln, err := net.Listen("tcp", s.cfg.MetricsListen)
		if err != nil {
			srv.Close()
			return errdefs.Wrap(errdefs.ErrUnavailable, err, "--metrics %s", s.cfg.MetricsListen)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", s.metrics.Handler())
		msrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { errc <- msrv.Serve(mln) }()
	}
	s.cfg.Logger.Info("key service node serving", "node", s.cfg.Name, "api", s.cfg.APIURL, "metrics", s.cfg.MetricsListen)
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	shut, stop := context.WithTimeout(context.Background(), 5*time.Second)
	defer stop()
	srv.Shutdown(shut)
	if msrv != nil {
		msrv.Shutdown(shut)
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// watchHealth reads from etcd every few seconds, so that the etcd health
// metric is current even while no request comes.
func (s *Service) watchHealth(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			var check []byte
			s.st.getJSON(ctx, keyCheck, &check)
		}
	}
}

// Run starts a node with cfg and serves until ctx ends. ready, when not
// nil, is called once the node answers.
func Run(ctx context.Context, cfg Config, ready func(*Service)) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	s, err := New(ctx, cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	// Listen once the node can answer: a connection means ready.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return errdefs.Wrap(errdefs.ErrUnavailable, err, "--listen %s", cfg.Listen)
	}
	defer ln.Close()
	if ready != nil {
		ready(s)
	}
	if err := s.Serve(ctx, ln); err != nil {
		return fmt.Errorf("key service node %s: %w", cfg.Name, err)
	}
	return nil
}
