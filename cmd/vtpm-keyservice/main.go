// Command vtpm-keyservice is the key service: a node (serve) that holds the
// fleet guardian and releases TPM data keys only to registered, attested
// hosts, storing everything in etcd (embedded by default), and the admin
// commands that talk to it. It is its own executable so that etcd stays
// out of vtpm, which every vTPM runs; `vtpm keyservice …` runs this.
package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/attest/tpmmode"
	"vtpm/internal/clirender"
	"vtpm/internal/keyservice"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	// `vtpm keyservice ARGS` runs `vtpm-keyservice keyservice ARGS`.
	// Its usage then names `vtpm keyservice`.
	root := rootCmd()
	if len(os.Args) > 1 && os.Args[1] == "keyservice" {
		vtpm := &cobra.Command{Use: "vtpm", SilenceUsage: true, SilenceErrors: true}
		root.Use = "keyservice"
		vtpm.AddCommand(root)
		root = vtpm
	}
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "vtpm-keyservice:", clirender.Error(err))
		os.Exit(1)
	}
}

func rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "vtpm-keyservice",
		Short:         "The key service: releases TPM keys to attested hosts (etcd-backed)",
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(serveCmd(), initCmd(), joinCmd(), hostCmd(), policyCmd(), vmPolicyCmd(), clientCmd(),
		auditCmd(), statusCmd(), backupCmd(), restoreCmd(), fleetCmd())
	return root
}

func serveCmd() *cobra.Command {
	var cfg keyservice.Config
	var endpoints string
	var verbose bool
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run a key service node (embedded single-node etcd in --data-dir by default)",
		Long: `Run a key service node. With no flags it serves on 127.0.0.1:7443 from an
embedded single-node etcd in the default data directory. A cluster of 3 or 5
nodes gives each node --name, its own --peer-url/--client-url and the same
--initial-cluster, and the same service key (--service-key, copied once, or
handed over by join). --etcd-endpoints uses an external etcd cluster instead.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level := slog.LevelInfo
			if verbose {
				level = slog.LevelDebug
			}
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			if endpoints != "" {
				cfg.EtcdEndpoints = strings.Split(endpoints, ",")
			}
			if err := readJoin(&cfg); err != nil {
				return err
			}
			cfg.Verifiers = append(cfg.Verifiers, tpmmode.Verifier{})
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return keyservice.Run(ctx, cfg, func(s *keyservice.Service) {
				c := s.Config()
				fmt.Fprintf(cmd.OutOrStdout(), "key service node %s serving on %s (data %s)\n", c.Name, c.APIURL, c.DataDir)
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.DataDir, "data-dir", "", "data directory (default "+keyservice.DefaultDataDir()+")")
	f.StringVar(&cfg.Name, "name", "", "this node's name (default \""+keyservice.DefaultName+"\")")
	f.StringVar(&cfg.Listen, "listen", "", "API address (default "+keyservice.DefaultListen+")")
	f.StringVar(&cfg.APIURL, "advertise-url", "", "the API URL clients use (default https://LISTEN)")
	f.StringVar(&cfg.PeerURL, "peer-url", "", "embedded etcd peer URL (default "+keyservice.DefaultPeerURL+")")
	f.StringVar(&cfg.ClientURL, "client-url", "", "embedded etcd client URL (default "+keyservice.DefaultClientURL+")")
	f.StringVar(&cfg.InitialCluster, "initial-cluster", "", "name=peerURL,… of every node of a new cluster")
	f.StringVar(&cfg.ClusterState, "initial-cluster-state", "", "new, or existing for a node added with join")
	f.StringVar(&endpoints, "etcd-endpoints", "", "use an external etcd cluster at these comma-separated URLs")
	f.StringVar(&cfg.ServiceKeyFile, "service-key", "", "the service key file (default DATA-DIR/service.key)")
	f.StringVar(&cfg.HostTPM, "host-tpm", os.Getenv("VTPM_HOST_TPM"), "seal a new service key to this host TPM (device:PATH or tcp:HOST:PORT; default $VTPM_HOST_TPM; none: a 0600 file)")
	f.StringVar(&cfg.MetricsListen, "metrics", "", "serve Prometheus metrics on this address (plain HTTP, /metrics)")
	f.DurationVar(&cfg.HealthLifetime, "health-lifetime", keyservice.DefaultHealthLifetime, "how long a health certificate is valid")
	f.DurationVar(&cfg.RequestTimeout, "request-timeout", keyservice.DefaultRequestTimeout, "how long a request waits for etcd")
	f.BoolVarP(&verbose, "verbose", "v", false, "log debug messages")
	return cmd
}

// joinFile is what join leaves in a new node's data directory for its
// first serve.
const joinFile = "join.json"

func readJoin(cfg *keyservice.Config) error {
	dir := cfg.DataDir
	if dir == "" {
		dir = keyservice.DefaultDataDir()
	}
	var j joinInfo
	if err := readJSON(filepath.Join(dir, joinFile), &j); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	if cfg.InitialCluster == "" {
		cfg.InitialCluster, cfg.ClusterState = j.InitialCluster, "existing"
	}
	if cfg.Name == "" {
		cfg.Name = j.Name
	}
	if cfg.PeerURL == "" {
		cfg.PeerURL = j.PeerURL
	}
	return nil
}

func timeout() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 60*time.Second)
}
