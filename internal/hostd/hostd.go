package hostd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/guardian"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/keyrelease"
	"vtpm/internal/keystore"
	"vtpm/internal/paths"
	"vtpm/internal/vm"
)

// Options configure a Server. The zero value serves the local key socket
// and the local API at their default paths, for the default data root.
type Options struct {
	// DataRoot is the host's data root (default paths.HostDataRoot()).
	DataRoot string
	// Socket is the local key socket for vTPMs (default
	// hostsvc.SocketPath()); one passed by systemd (LISTEN_FDS) wins.
	Socket string
	// APISocket is the local API's socket (default: beside Socket when
	// that is given, else APISocketPath()).
	APISocket string
	// Listen, when set, is the TCP address (HOST:PORT) of the API for
	// peers, over TLS 1.3 with mutual authentication.
	Listen string
	// Metrics, when set, is a TCP address serving /metrics over plain
	// HTTP, for a local scraper.
	Metrics string
	// Name is this host's name in its certificate and GetInfo (default
	// the system's host name).
	Name string
	// Version is reported by GetInfo.
	Version string
	// HostTPM is the keystore's hardware TPM (keystore.Options.HostTPM;
	// default $VTPM_HOST_TPM).
	HostTPM string
	// KeyService is the key service this host asks for the keys of TPMs
	// that only the fleet guardian opens (none: no bundle configured).
	KeyService keyrelease.Options
	Logger     *slog.Logger
}

// Server is a host service. Make one with New, run it with Run.
type Server struct {
	opts    Options
	log     *slog.Logger
	metrics *Metrics
	vms     *vm.Registry

	// mu guards peers and serialises changes to peers.json and to the
	// trusted owners.
	mu     sync.Mutex
	peers  []*Peer
	broker *keybroker.Broker
	local  *guardian.Guardian
	hasTLS bool
	// certMu guards cert, renewed while the service runs (certificate).
	certMu sync.Mutex
	cert   tls.Certificate
	ips    []net.IP

	services []Service
	ready    chan struct{}
}

// Service is an API service that another part of the host service
// provides (migration, transfer), as its Connect handler: path and handler
// as hostv1connect.NewXServiceHandler returns them.
type Service struct {
	Path    string
	Handler http.Handler
	// Local mounts it on the local API (this host's CLI); Remote on the
	// TLS API, for trusted peers only (PeerFrom names the caller).
	Local, Remote bool
}

// Register adds services to the API. Call it before Run.
func (s *Server) Register(svcs ...Service) { s.services = append(s.services, svcs...) }

// Name is this host's name, as its certificate and GetInfo give it.
func (s *Server) Name() string { return s.opts.Name }

// DataRoot is the host's data root.
func (s *Server) DataRoot() string { return s.opts.DataRoot }

// Logger is the service's log.
func (s *Server) Logger() *slog.Logger { return s.log }

// OpenKeys opens this host's keystore as the service's own is opened
// (its hardware TPM, its log), for services that open keys of their own.
func (s *Server) OpenKeys() (*keybroker.Broker, error) {
	return keybroker.Open(s.opts.DataRoot, keystore.Options{HostTPM: s.opts.HostTPM, Logger: s.log})
}

// KeySocket is the path of the key socket vTPMs of this data root ask
// (--socket; systemd's socket unit listens on the default path).
func (s *Server) KeySocket() string { return s.opts.Socket }

// VMs is the host's VM registry.
func (s *Server) VMs() *vm.Registry { return s.vms }

// Peers returns the hosts this host trusts now.
func (s *Server) Peers() []*Peer { return slices.Clone(s.currentPeers()) }

// New checks opts and returns a server; nothing is opened until Run.
func New(opts Options) (*Server, error) {
	if opts.DataRoot == "" {
		opts.DataRoot = paths.HostDataRoot()
	}
	if opts.APISocket == "" && opts.Socket != "" {
		opts.APISocket = APISocketBeside(opts.Socket)
	}
	if opts.Socket == "" {
		opts.Socket = hostsvc.SocketPath()
	}
	if opts.APISocket == "" {
		opts.APISocket = APISocketPath()
	}
	if opts.Name == "" {
		opts.Name, _ = os.Hostname()
		if opts.Name == "" {
			opts.Name = "localhost"
		}
	}
	if opts.HostTPM == "" {
		opts.HostTPM = os.Getenv("VTPM_HOST_TPM")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Listen != "" {
		if _, _, err := net.SplitHostPort(opts.Listen); err != nil {
			return nil, fmt.Errorf("--listen %q: want ADDRESS:PORT (such as 0.0.0.0:7443): %w", opts.Listen, err)
		}
	}
	if opts.Metrics != "" {
		if _, _, err := net.SplitHostPort(opts.Metrics); err != nil {
			return nil, fmt.Errorf("--metrics %q: want ADDRESS:PORT (such as 127.0.0.1:9464): %w", opts.Metrics, err)
		}
	}
	s := &Server{opts: opts, log: opts.Logger, ready: make(chan struct{})}
	s.vms = vm.NewRegistry(opts.DataRoot, func() (*keybroker.Broker, error) {
		return nil, errors.New("the host service does not open VMs' keys through the registry")
	})
	s.vms.Log = opts.Logger
	s.vms.HostSocket = opts.Socket
	s.metrics = NewMetrics(s.runningVTPMs)
	return s, nil
}

// Metrics returns the server's metrics, for the parts of the service that
// count events (migrations).
func (s *Server) Metrics() *Metrics { return s.metrics }

// Ready is closed once every listener of a running server is open.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Run runs the service until ctx ends, then stops it gracefully: the
// listeners close, calls in progress finish (within a few seconds), the
// keystore closes.
func (s *Server) Run(ctx context.Context) (err error) {
	cfg, err := hostsvc.ReadConfig(s.opts.DataRoot)
	if err != nil {
		return err
	}
	if s.peers, err = readPeers(s.opts.DataRoot); err != nil {
		return err
	}
	b, err := s.OpenKeys()
	if err != nil {
		return err
	}
	defer b.Close()
	s.broker = b
	// The host's guardian exists before the first vTPM asks, and is the
	// host's identity on the network.
	if s.local, err = b.Local(); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 4)
	serve := func(name string, f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil {
				errc <- fmt.Errorf("%s: %w", name, err)
				cancel()
			}
		}()
	}

	keys, cleanup, err := hostsvc.Listen(s.opts.Socket)
	if err != nil {
		return err
	}
	defer cleanup()
	ksvc := hostsvc.NewServer(b, cfg, s.log)
	ksvc.Refused = s.metrics.KeyOpenFailure
	if s.opts.KeyService.Configured(s.opts.DataRoot) {
		ko := s.opts.KeyService
		ko.Logger = s.log
		rel, err := keyrelease.New(s.opts.DataRoot, s.local, ko)
		if err != nil {
			return err
		}
		ksvc.Releaser = rel
		serve("key service", func() error { rel.Run(ctx); return nil })
		s.log.Info("host service: keys of fleet TPMs come from the key service", "host", rel.Name(), "endpoints", rel.Endpoints())
	}

	// The listeners opened so far, closed if a later one fails.
	var opened []net.Listener
	fail := func(err error) error {
		for _, l := range opened {
			l.Close()
		}
		return err
	}
	api, err := listenAPI(s.opts.APISocket)
	if err != nil {
		return err
	}
	opened = append(opened, api)
	var servers []*http.Server
	local := &http.Server{Handler: s.localHandler(), Protocols: h2c(), ReadHeaderTimeout: 10 * time.Second, ErrorLog: errorLog(s.log)}
	servers = append(servers, local)

	var tcp net.Listener
	var remote *http.Server
	if s.opts.Listen != "" {
		s.ips = listenIPs(s.opts.Listen)
		if s.cert, err = hostCertificate(b.Keystore(), s.local, s.opts.Name, s.ips); err != nil {
			return fail(fmt.Errorf("the host's TLS certificate: %w", err))
		}
		s.hasTLS = true
		if tcp, err = net.Listen("tcp", s.opts.Listen); err != nil {
			return fail(err)
		}
		opened = append(opened, tcp)
		remote = &http.Server{Handler: s.remoteHandler(), TLSConfig: serverTLS(s.certificate, s.currentPeers),
			ReadHeaderTimeout: 10 * time.Second, ErrorLog: errorLog(s.log)}
		servers = append(servers, remote)
	}
	var metrics *http.Server
	var ml net.Listener
	if s.opts.Metrics != "" {
		if ml, err = net.Listen("tcp", s.opts.Metrics); err != nil {
			return fail(err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", s.metrics.Handler())
		metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: errorLog(s.log)}
		servers = append(servers, metrics)
	}

	serve("key socket", func() error { return ksvc.Serve(ctx, keys) })
	serve("local API", func() error { return ignoreClosed(local.Serve(api)) })
	if remote != nil {
		serve("API", func() error { return ignoreClosed(remote.ServeTLS(tcp, "", "")) })
	}
	if metrics != nil {
		serve("metrics", func() error { return ignoreClosed(metrics.Serve(ml)) })
	}
	attrs := []any{"name", s.opts.Name, "socket", keys.Addr().String(), "api_socket", s.opts.APISocket,
		"data_root", s.opts.DataRoot, "users", cfg.Users, "guardian", s.local.Name(), "fingerprint", s.local.Fingerprint()}
	if tcp != nil {
		attrs = append(attrs, "listen", tcp.Addr().String())
	}
	if ml != nil {
		attrs = append(attrs, "metrics", ml.Addr().String())
	}
	s.log.Info("host service ready", attrs...)
	close(s.ready)

	<-ctx.Done()
	shut, done := context.WithTimeout(context.Background(), 5*time.Second)
	defer done()
	for _, srv := range servers {
		srv.Shutdown(shut)
	}
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
	}
	s.log.Info("host service stopped")
	return nil
}

func ignoreClosed(err error) error {
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// listenIPs are the addresses a listen address names, for the
// certificate: none for an unspecified address (peers pin the guardian,
// not an address).
func listenIPs(listen string) []net.IP {
	host, _, _ := net.SplitHostPort(listen)
	ip := net.ParseIP(host)
	if ip == nil || ip.IsUnspecified() {
		return nil
	}
	return []net.IP{ip}
}

// h2c is HTTP/2 without TLS (and HTTP/1.1), for the local socket.
func h2c() *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	return &p
}

// currentPeers is the peer list as of now.
func (s *Server) currentPeers() []*Peer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peers
}

// runningVTPMs counts the registered VMs whose vTPM runs.
func (s *Server) runningVTPMs() int {
	list, err := s.vms.List(false)
	if err != nil {
		return 0
	}
	n := 0
	for _, v := range list {
		if v.TPMPid != 0 {
			n++
		}
	}
	return n
}

// localHandler serves the local API: HostService and PeerService.
func (s *Server) localHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle(hostv1connect.NewHostServiceHandler(&hostService{s: s}))
	mux.Handle(hostv1connect.NewPeerServiceHandler(&peerService{s: s}))
	mux.Handle("/metrics", s.metrics.Handler())
	for _, svc := range s.services {
		if svc.Local {
			mux.Handle(svc.Path, svc.Handler)
		}
	}
	return mux
}

// remoteHandler serves peers: HostService and the metrics, each call
// admitted only for a peer trusted at that moment.
func (s *Server) remoteHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle(hostv1connect.NewHostServiceHandler(&hostService{s: s}))
	mux.Handle("/metrics", s.metrics.Handler())
	for _, svc := range s.services {
		if svc.Remote {
			mux.Handle(svc.Path, svc.Handler)
		}
	}
	return s.admit(mux)
}
