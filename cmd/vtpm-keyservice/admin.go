package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/internal/errdefs"
	"vtpm/internal/keyservice"
	"vtpm/internal/keyservice/client"
	"vtpm/internal/secretfile"
)

// bundleFlag is --bundle: the client bundle, else $VTPM_KEYSERVICE_BUNDLE,
// else admin.json in the default data directory (where init writes it).
func bundleFlag(cmd *cobra.Command) *string {
	p := new(string)
	cmd.Flags().StringVar(p, "bundle", "", "client bundle (default $VTPM_KEYSERVICE_BUNDLE, else DATA-DIR/admin.json)")
	return p
}

func bundlePath(flag string) string {
	if flag != "" {
		return flag
	}
	if e := os.Getenv("VTPM_KEYSERVICE_BUNDLE"); e != "" {
		return e
	}
	return filepath.Join(keyservice.DefaultDataDir(), "admin.json")
}

func connect(flag string) (*client.Client, error) {
	b, err := client.ReadBundle(bundlePath(flag))
	if err != nil {
		return nil, err
	}
	return client.New(b, client.Options{})
}

// bootstrap is a client without a certificate for a node whose data
// directory is here (its service key gives the init token, its ca.pem the
// CA to trust).
func bootstrap(dataDir, server, keyFile string) (*client.Client, []byte, error) {
	if dataDir == "" {
		dataDir = keyservice.DefaultDataDir()
	}
	if keyFile == "" {
		keyFile = filepath.Join(dataDir, "service.key")
	}
	token, err := keyservice.ReadInitToken(keyFile)
	if err != nil {
		return nil, nil, err
	}
	ca, err := os.ReadFile(filepath.Join(dataDir, "ca.pem"))
	if err != nil {
		return nil, nil, errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "the node's CA certificate").With(
			errdefs.Advise("start the node (serve) with this data directory first"))
	}
	c, err := client.NewBootstrap(strings.Split(server, ","), ca, client.Options{})
	return c, token, err
}

func initCmd() *cobra.Command {
	var dataDir, server, keyFile, fleet, admin, out string
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create the fleet guardian and the first admin's client bundle",
		Long: `Create the fleet guardian (HPKE MLKEM768-X25519 + ECDSA P-256, X.509) in the
key service and write the first admin's client bundle. Run it on a node: the
node's service key authorizes it. Prints the fleet guardian's certificates.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, token, err := bootstrap(dataDir, server, keyFile)
			if err != nil {
				return err
			}
			key, pub, err := client.NewKey()
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			r, err := c.Init(ctx, &ksv1.InitRequest{Token: token, FleetName: fleet, AdminName: admin, AdminPublicKey: pub})
			if err != nil {
				return err
			}
			b, err := client.NewBundle(admin, "admin", r.Admin.Endpoints, r.Admin.CaCertificate, r.Admin.Certificate, key)
			if err != nil {
				return err
			}
			if out == "" {
				d := dataDir
				if d == "" {
					d = keyservice.DefaultDataDir()
				}
				out = filepath.Join(d, "admin.json")
			}
			if err := b.Write(out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "admin bundle written to %s\n", out)
			_, err = cmd.OutOrStdout().Write(r.FleetGuardian)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&dataDir, "data-dir", "", "the node's data directory (default "+keyservice.DefaultDataDir()+")")
	f.StringVar(&server, "server", "https://"+keyservice.DefaultListen, "the node's API URL")
	f.StringVar(&keyFile, "service-key", "", "the node's service key (default DATA-DIR/service.key)")
	f.StringVar(&fleet, "fleet-name", "fleet", "the fleet guardian's name")
	f.StringVar(&admin, "admin-name", "admin", "the first admin's name")
	f.StringVarP(&out, "output", "o", "", "the admin bundle (default DATA-DIR/admin.json)")
	return cmd
}

type joinInfo struct {
	Name           string `json:"name"`
	PeerURL        string `json:"peer_url"`
	InitialCluster string `json:"initial_cluster"`
}

func joinCmd() *cobra.Command {
	var name, peer, dataDir, hostTPM string
	cmd := &cobra.Command{
		Use:   "join",
		Short: "Add a node to a running cluster (then serve with the same --data-dir)",
		Long: `Add an etcd member for a new node to the running cluster and prepare the new
node's data directory: the service key (handed over on the authenticated
API) and the cluster to join. Then run serve with that --data-dir, the same
--name and --peer-url, and its own --listen and --client-url.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bundle := cmd.Flag("bundle").Value.String()
			c, err := connect(bundle)
			if err != nil {
				return err
			}
			if name == "" || peer == "" || dataDir == "" {
				return errdefs.New(errdefs.ErrInvalidArgument, "join needs --name, --peer-url and --data-dir of the new node")
			}
			ctx, cancel := timeout()
			defer cancel()
			r, err := c.AddMember(ctx, &ksv1.AddMemberRequest{Name: name, PeerUrls: []string{peer}})
			if err != nil {
				return err
			}
			if err := keyservice.SaveServiceKey(filepath.Join(dataDir, "service.key"), r.ServiceKey, hostTPM); err != nil {
				return err
			}
			if err := writeJSON(filepath.Join(dataDir, joinFile), joinInfo{Name: name, PeerURL: peer, InitialCluster: r.InitialCluster}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "member %s added; start it: serve --data-dir %s --name %s --peer-url %s\n", name, dataDir, name, peer)
			return nil
		},
	}
	bundleFlag(cmd)
	f := cmd.Flags()
	f.StringVar(&name, "name", "", "the new node's name")
	f.StringVar(&peer, "peer-url", "", "the new node's etcd peer URL")
	f.StringVar(&dataDir, "data-dir", "", "the new node's data directory")
	f.StringVar(&hostTPM, "host-tpm", os.Getenv("VTPM_HOST_TPM"), "seal the service key to this host TPM (default $VTPM_HOST_TPM; none: a 0600 file)")
	return cmd
}

func hostCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "host", Short: "Register, remove, revoke and list hosts"}
	var mode, guardianFile, ekFile, policy, out string
	var groups []string
	add := &cobra.Command{
		Use:   "add NAME",
		Short: "Register a host and write its client bundle",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			g, err := os.ReadFile(guardianFile)
			if err != nil {
				return fmt.Errorf("--guardian: %w", err)
			}
			var ek []byte
			if ekFile != "" {
				if ek, err = os.ReadFile(ekFile); err != nil {
					return fmt.Errorf("--ek: %w", err)
				}
			}
			key, pub, err := client.NewKey()
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			r, err := c.AddHost(ctx, &ksv1.AddHostRequest{Host: &ksv1.Host{Name: args[0], Mode: mode, Groups: groups, Guardian: g, Ek: ek, Policy: policy}, PublicKey: pub})
			if err != nil {
				return err
			}
			b, err := client.NewBundle(args[0], "host", r.Client.Endpoints, r.Client.CaCertificate, r.Client.Certificate, key)
			if err != nil {
				return err
			}
			if out == "" {
				out = args[0] + ".keyservice.json"
			}
			if err := b.Write(out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "host %s registered (%s mode); its client bundle is %s: give it to the host's service\n", args[0], mode, out)
			return nil
		},
	}
	bundleFlag(add)
	f := add.Flags()
	f.StringVar(&mode, "mode", "key", "attestation mode: key (proves its guardian key) or tpm (proves its boot)")
	f.StringVar(&guardianFile, "guardian", "", "the host guardian's certificates (PEM)")
	f.StringVar(&ekFile, "ek", "", "tpm mode: the host TPM's EK public key or certificate")
	f.StringVar(&policy, "policy", "", "tpm mode: the attestation policy")
	f.StringSliceVar(&groups, "group", nil, "host group (repeat)")
	f.StringVarP(&out, "output", "o", "", "the host's client bundle (default NAME.keyservice.json)")
	add.MarkFlagRequired("guardian")

	simple := func(use, short string, do func(*client.Client, string) error, done string) *cobra.Command {
		c := &cobra.Command{
			Use: use + " NAME", Short: short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := connect(cmd.Flag("bundle").Value.String())
				if err != nil {
					return err
				}
				if err := do(c, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "host %s %s\n", args[0], done)
				return nil
			},
		}
		bundleFlag(c)
		return c
	}
	remove := simple("remove", "Unregister a host", func(c *client.Client, n string) error {
		ctx, cancel := timeout()
		defer cancel()
		return c.RemoveHost(ctx, n)
	}, "removed")
	revoke := simple("revoke", "Revoke a host: refused from its next request on", func(c *client.Client, n string) error {
		ctx, cancel := timeout()
		defer cancel()
		return c.RevokeHost(ctx, n)
	}, "revoked")

	var asJSON bool
	ls := &cobra.Command{
		Use: "list", Short: "List the registered hosts", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			hs, err := c.ListHosts(ctx)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), &ksv1.ListHostsResponse{Hosts: hs})
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tMODE\tGROUPS\tSTATE\tHEALTH UNTIL\tLAST FAILURE")
			for _, h := range hs {
				state := "registered"
				switch {
				case h.Revoked:
					state = "revoked"
				case h.HealthNotAfterUnix > time.Now().Unix():
					state = "attested"
				}
				until := "-"
				if h.HealthNotAfterUnix > 0 {
					until = time.Unix(h.HealthNotAfterUnix, 0).UTC().Format(time.RFC3339)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", h.Name, h.Mode, strings.Join(h.Groups, ","), state, until, h.LastFailure)
			}
			return w.Flush()
		},
	}
	bundleFlag(ls)
	ls.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.AddCommand(add, remove, revoke, ls, hostEKCmd())
	return cmd
}

func policyCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Attestation policies (accepted boots of TPM-mode hosts)"}
	var file string
	set := &cobra.Command{
		Use: "set NAME", Short: "Store an attestation policy from a JSON file", Args: cobra.ExactArgs(1),
		Long: `Store an attestation policy. The file holds
{"classes": [{"name": "CLASS", "pcrs": {"0": "<base64 SHA-256>", …}}], "requireSecureBoot": true}
(the API's JSON form of Policy).`,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			var p ksv1.Policy
			b, err := os.ReadFile(file)
			if err != nil {
				return err
			}
			if err := protojson.Unmarshal(b, &p); err != nil {
				return errdefs.Wrap(errdefs.ErrInvalidArgument, err, "policy %s", file)
			}
			p.Name = args[0]
			ctx, cancel := timeout()
			defer cancel()
			if err := c.SetPolicy(ctx, &p); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "policy %s stored\n", args[0])
			return nil
		},
	}
	bundleFlag(set)
	set.Flags().StringVarP(&file, "file", "f", "", "the policy (JSON)")
	set.MarkFlagRequired("file")
	ls := &cobra.Command{
		Use: "list", Short: "List the attestation policies (JSON)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			ps, err := c.ListPolicies(ctx)
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), &ksv1.ListPoliciesResponse{Policies: ps})
		},
	}
	bundleFlag(ls)
	cmd.AddCommand(set, ls, policyCaptureCmd())
	return cmd
}

func vmPolicyCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "vm-policy", Short: "Which host groups may run a TPM's VM"}
	var groups []string
	var remove bool
	set := &cobra.Command{
		Use: "set TPM-UUID|default", Short: "Allow only hosts of these groups (none: any attested host)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			if err := c.SetVMPolicy(ctx, &ksv1.VMPolicy{Tpm: args[0], Groups: groups}, remove); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "VM policy of %s stored\n", args[0])
			return nil
		},
	}
	bundleFlag(set)
	set.Flags().StringSliceVar(&groups, "group", nil, "host group allowed (repeat)")
	set.Flags().BoolVar(&remove, "remove", false, "remove the policy")
	ls := &cobra.Command{
		Use: "list", Short: "List the VM policies", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			ps, err := c.ListVMPolicies(ctx)
			if err != nil {
				return err
			}
			for _, p := range ps {
				fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\n", p.Tpm, strings.Join(p.Groups, ","))
			}
			return nil
		},
	}
	bundleFlag(ls)
	cmd.AddCommand(set, ls)
	return cmd
}

func clientCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "client", Short: "Client certificates of admins and reviewers"}
	var role, out string
	add := &cobra.Command{
		Use: "add NAME", Short: "Issue a client bundle with a role (admin, reviewer)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			key, pub, err := client.NewKey()
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			r, err := c.IssueClient(ctx, &ksv1.IssueClientRequest{Name: args[0], Role: role, PublicKey: pub})
			if err != nil {
				return err
			}
			b, err := client.NewBundle(args[0], role, r.Client.Endpoints, r.Client.CaCertificate, r.Client.Certificate, key)
			if err != nil {
				return err
			}
			if out == "" {
				out = args[0] + ".keyservice.json"
			}
			if err := b.Write(out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s bundle for %s written to %s\n", role, args[0], out)
			return nil
		},
	}
	bundleFlag(add)
	add.Flags().StringVar(&role, "role", "reviewer", "admin or reviewer")
	add.Flags().StringVarP(&out, "output", "o", "", "the bundle (default NAME.keyservice.json)")
	cmd.AddCommand(add)
	return cmd
}

func auditCmd() *cobra.Command {
	var verify, asJSON bool
	var after uint64
	cmd := &cobra.Command{
		Use: "audit", Short: "Print the audit log; --verify checks its hash chain", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			r, err := c.Audit(ctx, after, verify)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				if err := printJSON(out, r); err != nil {
					return err
				}
			} else if !verify {
				w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "SEQ\tTIME\tNODE\tEVENT\tHOST\tTPM\tOUTCOME\tREASON\tDETAIL")
				for _, x := range r.Records {
					fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", x.Seq, time.Unix(0, x.TimeUnixNano).UTC().Format(time.RFC3339),
						x.Node, x.Event, x.Host, x.Tpm, x.Outcome, x.Reason, x.Detail)
				}
				if err := w.Flush(); err != nil {
					return err
				}
			}
			if verify {
				if !r.Verified {
					return &AuditBrokenError{FirstBad: r.FirstBad, Problem: r.Problem}
				}
				if !asJSON {
					fmt.Fprintf(out, "audit log verified: %d records, hash chain intact\n", len(r.Records))
				}
			}
			return nil
		},
	}
	bundleFlag(cmd)
	cmd.Flags().BoolVar(&verify, "verify", false, "recompute the hash chain and name the first bad record")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().Uint64Var(&after, "after", 0, "only records after this sequence number")
	return cmd
}

// AuditBrokenError: the audit chain does not verify. It matches
// errdefs.ErrDataLoss.
type AuditBrokenError struct {
	FirstBad uint64
	Problem  string
}

func (e *AuditBrokenError) Error() string {
	return fmt.Sprintf("audit log does not verify at record %d: %s", e.FirstBad, e.Problem)
}

// Is reports whether target is errdefs.ErrDataLoss.
func (e *AuditBrokenError) Is(target error) bool { return target == errdefs.ErrDataLoss }

func statusCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use: "status", Short: "Members, leader, quorum, hosts attested, certificates expiring", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			st, err := c.Status(ctx)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(out, st)
			}
			fmt.Fprintf(out, "node:         %s (%s etcd)\n", st.Node, st.Storage)
			fmt.Fprintf(out, "quorum:       %v\n", st.Quorum)
			fmt.Fprintf(out, "leader:       %s\n", orDash(st.Leader))
			fmt.Fprintf(out, "fleet:        %s\n", orDash(st.FleetFingerprint))
			fmt.Fprintf(out, "hosts:        %d registered, %d attested\n", st.HostsRegistered, st.HostsAttested)
			fmt.Fprintf(out, "audit:        %d records\n", st.AuditRecords)
			weaker := ""
			if st.ServiceKeyWeaker {
				weaker = " [weaker]"
			}
			fmt.Fprintf(out, "service key:  %s%s\n", st.ServiceKeyStorage, weaker)
			w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "MEMBER\tAPI\tETCD\tSTATE")
			sort.Slice(st.Members, func(i, j int) bool { return st.Members[i].Name < st.Members[j].Name })
			for _, m := range st.Members {
				state := "up"
				if m.Leader {
					state = "up, leader"
				}
				if !m.Reachable {
					state = orDash(m.Error)
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", m.Name, orDash(m.ApiUrl), strings.Join(m.ClientUrls, ","), state)
			}
			w.Flush()
			for _, e := range st.Expiring {
				fmt.Fprintf(out, "expiring:     host %s's health certificate at %s\n", e.Host, time.Unix(e.NotAfterUnix, 0).UTC().Format(time.RFC3339))
			}
			return nil
		},
	}
	bundleFlag(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func backupCmd() *cobra.Command {
	var out, passFile string
	cmd := &cobra.Command{
		Use: "backup -o FILE", Short: "Back up the whole service state, encrypted under a passphrase", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			pass, err := secretfile.Read(passFile, "VTPM_PASSPHRASE", "passphrase")
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			b, err := c.Backup(ctx, pass)
			if err != nil {
				return err
			}
			return secretfile.Create(out, b, 0o600, cmd.OutOrStdout())
		},
	}
	bundleFlag(cmd)
	cmd.Flags().StringVarP(&out, "output", "o", "", "the backup file (new)")
	cmd.Flags().StringVar(&passFile, "passphrase-file", "", "file whose first line is the passphrase (else $VTPM_PASSPHRASE)")
	return cmd
}

func restoreCmd() *cobra.Command {
	var dataDir, server, keyFile, passFile string
	cmd := &cobra.Command{
		Use: "restore FILE", Short: "Restore a backup onto new or wiped nodes (run on a node)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, token, err := bootstrap(dataDir, server, keyFile)
			if err != nil {
				return err
			}
			data, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			pass, err := secretfile.Read(passFile, "VTPM_PASSPHRASE", "passphrase")
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			r, err := c.Restore(ctx, &ksv1.RestoreRequest{Token: token, Backup: data, Passphrase: pass})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "restored %d keys; fleet guardian %s\n", r.Keys, r.FleetFingerprint)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dataDir, "data-dir", "", "the node's data directory (default "+keyservice.DefaultDataDir()+")")
	f.StringVar(&server, "server", "https://"+keyservice.DefaultListen, "the node's API URL")
	f.StringVar(&keyFile, "service-key", "", "the node's service key (default DATA-DIR/service.key)")
	f.StringVar(&passFile, "passphrase-file", "", "file whose first line is the passphrase (else $VTPM_PASSPHRASE)")
	return cmd
}

func fleetCmd() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use: "fleet-guardian", Short: "Print the fleet guardian's certificates (to grant it to protectors)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := connect(cmd.Flag("bundle").Value.String())
			if err != nil {
				return err
			}
			ctx, cancel := timeout()
			defer cancel()
			r, err := c.FleetGuardian(ctx)
			if err != nil {
				return err
			}
			return secretfile.Create(out, r.Certificates, 0o644, cmd.OutOrStdout())
		},
	}
	bundleFlag(cmd)
	cmd.Flags().StringVarP(&out, "output", "o", "", "write to a new file instead of standard output")
	return cmd
}

// printJSON prints an API message in the API's JSON form (protojson), the
// form a console reads too.
func printJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "\t")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o600)
}
