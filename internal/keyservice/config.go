package keyservice

import (
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/keyservice/verify"
	"vtpm/internal/paths"
)

// Defaults. The ports are not etcd's usual 2379/2380, so that an external
// etcd on the same machine does not collide with the embedded one.
const (
	DefaultListen         = "127.0.0.1:7443"
	DefaultClientURL      = "http://127.0.0.1:7444"
	DefaultPeerURL        = "http://127.0.0.1:7445"
	DefaultName           = "keyservice"
	DefaultHealthLifetime = 8 * time.Hour
	DefaultRequestTimeout = 3 * time.Second
)

// DefaultDataDir is the key service's data directory under vtpm's data
// root.
func DefaultDataDir() string { return filepath.Join(paths.DataRoot(), "keyservice") }

// Config configures a node. The zero value of every field but Verifiers
// takes its default in Validate.
type Config struct {
	Name    string // the node's name, its etcd member's name
	DataDir string // etcd's data, the service key, ca.pem

	Listen string // the API's address (host:port)
	APIURL string // the URL clients use; https://Listen by default

	// The embedded etcd member.
	PeerURL        string
	ClientURL      string
	InitialCluster string // name=peerURL,…; this node alone by default
	ClusterState   string // new or existing (a node added with join)

	// An external etcd cluster instead of the embedded member.
	EtcdEndpoints []string

	ServiceKeyFile string        // the service key; <DataDir>/service.key by default
	HostTPM        string        // seal a new service key to this host TPM (keystore.Options.HostTPM's form); "" or "none": a file
	MetricsListen  string        // Prometheus metrics (plain HTTP); none when empty
	HealthLifetime time.Duration // how long a health certificate is valid
	RequestTimeout time.Duration // how long a request waits for etcd

	Verifiers []verify.Verifier // attestation modes besides key mode
	Logger    *slog.Logger
}

// Validate fills defaults and checks c, naming the flag to fix. It has no
// side effects.
func (c *Config) Validate() error {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir()
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return errdefs.Wrap(errdefs.ErrInvalidArgument, err, "--listen %q: want HOST:PORT", c.Listen)
	}
	if c.APIURL == "" {
		// Clients need an address they can dial, and the node's TLS
		// certificate names it.
		host, _, _ := net.SplitHostPort(c.Listen)
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			return errdefs.New(errdefs.ErrInvalidArgument, "--listen %s accepts any address: give --advertise-url, the URL clients use (https://HOST:PORT)", c.Listen)
		}
		c.APIURL = "https://" + c.Listen
	}
	if c.PeerURL == "" {
		c.PeerURL = DefaultPeerURL
	}
	if c.ClientURL == "" {
		c.ClientURL = DefaultClientURL
	}
	for flag, v := range map[string]string{"--peer-url": c.PeerURL, "--client-url": c.ClientURL, "--advertise-url": c.APIURL} {
		if u, err := url.Parse(v); err != nil || u.Host == "" {
			return errdefs.New(errdefs.ErrInvalidArgument, "%s %q: want a URL such as http://127.0.0.1:7445", flag, v)
		}
	}
	if c.InitialCluster != "" && !strings.Contains(c.InitialCluster, c.Name+"=") {
		return errdefs.New(errdefs.ErrInvalidArgument, "--initial-cluster %q does not name this node (--name %s)", c.InitialCluster, c.Name)
	}
	switch c.ClusterState {
	case "", "new", "existing":
	default:
		return errdefs.New(errdefs.ErrInvalidArgument, "--initial-cluster-state %q: want new or existing", c.ClusterState)
	}
	if len(c.EtcdEndpoints) > 0 && c.InitialCluster != "" {
		return errdefs.New(errdefs.ErrInvalidArgument, "--etcd-endpoints and --initial-cluster exclude each other: use an external etcd or embedded members")
	}
	if c.ServiceKeyFile == "" {
		c.ServiceKeyFile = filepath.Join(c.DataDir, "service.key")
	}
	if c.HealthLifetime == 0 {
		c.HealthLifetime = DefaultHealthLifetime
	}
	if c.HealthLifetime < 0 {
		return errdefs.New(errdefs.ErrInvalidArgument, "--health-lifetime %v must be positive", c.HealthLifetime)
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}
