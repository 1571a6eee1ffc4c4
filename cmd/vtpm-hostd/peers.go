package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/internal/apierr"
	"vtpm/internal/hostd"
)

// local is the local host service's API.
func local() *hostd.LocalClient { return hostd.DialLocal(apiSocket) }

// callErr is a failed call's error as the service sent it: its kind, its
// message and its remedies; or the local service not answering.
func callErr(err error) error {
	var unreachable *hostd.UnreachableError
	if errors.As(err, &unreachable) {
		return unreachable
	}
	return apierr.FromConnect(err, "")
}

func trustCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "trust NAME ADDRESS CERTS.pem",
		Short: "Trust another host: it may call this host's API, and its guardian owns TPMs that open here",
		Long: `Admit host NAME, whose host service listens on ADDRESS (HOST:PORT, its
--listen), given its guardian's public certificates (on that host:
vtpm guardian export --certs-only -o NAME.pem). Check the fingerprint
this prints against that host's vtpm guardian list before relying on it.

A trusted host may call this host's API (its TLS certificate must be issued
under that guardian), and the guardian becomes a trusted owner of key
protectors here (as vtpm guardian trust does), so TPMs it owns open here
when this host holds a row of their protector.`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			certs, err := os.ReadFile(args[2])
			if err != nil {
				return err
			}
			rsp, err := local().Peers.TrustPeer(cmd.Context(), connect.NewRequest(&hostv1.TrustPeerRequest{Name: args[0], Address: args[1], Certificates: certs}))
			if err != nil {
				return callErr(err)
			}
			p := rsp.Msg.GetPeer()
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "trusting host %s at %s: guardian %s, fingerprint %s\n", p.GetName(), p.GetAddress(), p.GetGuardianName(), p.GetGuardianFingerprint())
			if rsp.Msg.GetOwnerTrusted() {
				fmt.Fprintf(w, "TPMs owned by guardian %s now open here when this host holds a row of their protector\n", p.GetGuardianName())
			}
			return nil
		},
	}
}

func untrustCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "untrust NAME",
		Short: "Stop trusting a host (and its guardian as an owner, if trusting the host made it one)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rsp, err := local().Peers.UntrustPeer(cmd.Context(), connect.NewRequest(&hostv1.UntrustPeerRequest{Name: args[0]}))
			if err != nil {
				return callErr(err)
			}
			p := rsp.Msg.GetPeer()
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "no longer trusting host %s (guardian %s, fingerprint %s)\n", p.GetName(), p.GetGuardianName(), p.GetGuardianFingerprint())
			if rsp.Msg.GetOwnerUntrusted() {
				fmt.Fprintf(w, "TPMs owned by guardian %s no longer open here\n", p.GetGuardianName())
			}
			return nil
		},
	}
}

func listCmd() *cobra.Command {
	var asJSON, offline bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the hosts this host trusts: reachable, version, and whether each still presents the trusted certificate",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rsp, err := local().Peers.ListPeers(cmd.Context(), connect.NewRequest(&hostv1.ListPeersRequest{Offline: offline}))
			if err != nil {
				return callErr(err)
			}
			list := []hostd.PeerListing{}
			for _, st := range rsp.Msg.GetPeers() {
				list = append(list, hostd.Listing(st))
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), list)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, strings.Join(hostd.PeerColumns, "\t"))
			for _, l := range list {
				fmt.Fprintln(tw, strings.Join(l.Row(), "\t"))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, l := range list {
				if l.Error != "" {
					fmt.Fprintf(cmd.ErrOrStderr(), "%s: %s\n", l.Name, l.Error)
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVar(&offline, "offline", false, "do not contact the hosts")
	return cmd
}

func infoCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "info [NAME]",
		Short: "Describe this host, or trusted host NAME (asked by this host's service)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := local()
			var info *hostv1.GetInfoResponse
			if len(args) == 0 {
				rsp, err := c.Host.GetInfo(cmd.Context(), connect.NewRequest(&hostv1.GetInfoRequest{}))
				if err != nil {
					return callErr(err)
				}
				info = rsp.Msg
			} else {
				rsp, err := c.Peers.PeerInfo(cmd.Context(), connect.NewRequest(&hostv1.PeerInfoRequest{Name: args[0]}))
				if err != nil {
					return callErr(err)
				}
				info = rsp.Msg
			}
			v := hostd.Info(info)
			if asJSON {
				return printJSON(cmd.OutOrStdout(), v)
			}
			v.WriteText(cmd.OutOrStdout())
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
