package main

import (
	"fmt"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/internal/clirender"
	"vtpm/internal/fleet"
	"vtpm/internal/hostd"
	"vtpm/internal/progress"
	"vtpm/internal/transfersvc"
	"vtpm/internal/vm"
)

// The commands that act on other hosts: `vtpm vm move|copy`, `vtpm vm
// deploy … --on`, `vtpm vm list --hosts` and `vtpm tpm enable|disable
// --all --hosts`, forwarded here by vtpm. Each asks the local host service,
// which talks to its peers.

func vmCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "vm", Short: "Move, copy and deploy VMs to other hosts; list the VMs of many hosts"}
	cmd.AddCommand(vmMoveCmd(), vmCopyCmd(), vmDeployCmd(), vmListCmd(), vmMigrateCmd())
	return cmd
}

func tpmCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "tpm", Short: "Switch the TPMs of every VM on many hosts"}
	cmd.AddCommand(tpmSwitchCmd(true), tpmSwitchCmd(false))
	return cmd
}

func vmMoveCmd() *cobra.Command {
	var to string
	var asJSON, grant bool
	cmd := &cobra.Command{
		Use:   "move VM --to HOST [--grant]",
		Short: "Move a stopped VM or template to a trusted host: same name, UUID and TPM",
		Long: `Move a stopped VM (or template) to HOST, a host this host trusts. Its bundle
travels over the hosts' authenticated channel, is verified on arrival and
registered there; only then does the VM leave this host, whose TPM state is
kept as a backup under the data root. The TPM travels sealed: HOST must hold a
guardian its key protector admits (and trust its owner), which pre-flight checks
before anything is sent; --grant admits HOST's guardian to the protector first
(this host must own it). Disks outside the bundle are carried into it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return sendVM(cmd, &hostv1.SendVMRequest{Op: string(vm.OpMove), Vm: args[0], To: to, Grant: grant}, "moved", asJSON)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the trusted host to move it to")
	cmd.MarkFlagRequired("to")
	cmd.Flags().BoolVar(&grant, "grant", false, "admit HOST's guardian to the TPM's key protector first")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func vmCopyCmd() *cobra.Command {
	var to, name, tpm string
	var asJSON, grant bool
	cmd := &cobra.Command{
		Use:   "copy VM --to HOST [--name NEW] [--tpm new|copy|none]",
		Short: "Copy a stopped VM or template to a trusted host, as vm clone does: its own UUID, a new, copied or no TPM",
		Long: `Copy a stopped VM (or template) to HOST under its own UUID (and --name, or the
same name). --tpm new (default) manufactures a fresh vTPM there: a new identity,
EK and certificates. --tpm copy sends the TPM sealed (HOST must be able to open
it) and re-keys it there under a new data key and TPM UUID owned by HOST: the
two VMs then share one EK (--grant admits HOST's guardian to the protector
first). --tpm none leaves the copy without a TPM.`,
		Args: cobra.ExactArgs(1),
		PreRunE: func(*cobra.Command, []string) error {
			_, err := vm.ParseTPMMode(tpm)
			return err
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return sendVM(cmd, &hostv1.SendVMRequest{Op: string(vm.OpCopy), Vm: args[0], To: to, Name: name, Tpm: tpm, Grant: grant}, "copied", asJSON)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the trusted host to copy it to")
	cmd.MarkFlagRequired("to")
	cmd.Flags().StringVar(&name, "name", "", "the copy's name (default the VM's)")
	cmd.Flags().StringVar(&tpm, "tpm", "new", "the copy's TPM: new, copy or none")
	cmd.Flags().BoolVar(&grant, "grant", false, "with --tpm copy: admit HOST's guardian to the TPM's key protector first")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func vmDeployCmd() *cobra.Command {
	var on string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "deploy TEMPLATE NEW --on HOST",
		Short: "Create a VM from a template of this host on a trusted host, with a freshly manufactured vTPM there",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return sendVM(cmd, &hostv1.SendVMRequest{Op: string(vm.OpDeploy), Vm: args[0], To: on, Name: args[1]}, "deployed", asJSON)
		},
	}
	cmd.Flags().StringVar(&on, "on", "", "the trusted host to deploy it on")
	cmd.MarkFlagRequired("on")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// sendResult is a transfer's outcome as --json prints it.
type sendResult struct {
	Op         string   `json:"op"`
	VM         string   `json:"vm"`
	To         string   `json:"to"`
	Name       string   `json:"name"`
	UUID       string   `json:"uuid"`
	Path       string   `json:"path"`
	TPM        string   `json:"tpm"`
	Bytes      int64    `json:"bytes"`
	DurationMS int64    `json:"duration_ms"`
	Backup     string   `json:"backup,omitempty"`
	Notes      []string `json:"notes,omitempty"`
	Warnings   []string `json:"warnings,omitempty"`
}

func sendVM(cmd *cobra.Command, req *hostv1.SendVMRequest, verb string, asJSON bool) error {
	stream, err := hostd.DialFleet(apiSocket).SendVM(cmd.Context(), connect.NewRequest(req))
	if err != nil {
		return callErr(err)
	}
	defer stream.Close()
	errw := cmd.ErrOrStderr()
	tty := !asJSON && progress.IsTerminal(errw)
	var res *hostv1.SendVMResult
	for stream.Receive() {
		switch ev := stream.Msg().GetEvent().(type) {
		case *hostv1.SendVMResponse_Progress:
			if tty {
				p := ev.Progress
				fmt.Fprintf(errw, "\r\033[Ksent %d of %d MiB", p.GetSentBytes()>>20, p.GetTotalBytes()>>20)
			}
		case *hostv1.SendVMResponse_Result:
			res = ev.Result
		}
	}
	if tty {
		fmt.Fprint(errw, "\r\033[K")
	}
	if err := stream.Err(); err != nil {
		return callErr(err)
	}
	if res == nil {
		return fmt.Errorf("the host service ended the %s without its result", req.GetOp())
	}
	a := res.GetArrived()
	j := sendResult{Op: res.GetOp(), VM: res.GetVm(), To: res.GetTo(), Name: a.GetName(), UUID: a.GetUuid(), Path: a.GetPath(), TPM: a.GetTpm(),
		Bytes: res.GetBytes(), DurationMS: time.Duration(res.GetDurationNs()).Milliseconds(), Backup: res.GetBackup(), Notes: res.GetNotes(), Warnings: res.GetWarnings()}
	for _, w := range j.Warnings {
		fmt.Fprintln(errw, w)
	}
	if asJSON {
		return printJSON(cmd.OutOrStdout(), j)
	}
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "%s %s to %s as %s (%s) in %s; TPM %s; %d MiB in %v\n", verb, j.VM, j.To, j.Name, j.UUID, j.Path, j.TPM,
		j.Bytes>>20, time.Duration(res.GetDurationNs()).Round(time.Millisecond))
	for _, n := range j.Notes {
		fmt.Fprintln(w, n)
	}
	return nil
}

func vmListCmd() *cobra.Command {
	var hosts string
	var asJSON bool
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "list --hosts all|A,B [--json]",
		Short: "List the VMs of this host and its trusted peers: one line per VM per host, unreachable hosts reported",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rsp, err := hostd.DialFleet(apiSocket).ListVMs(cmd.Context(), connect.NewRequest(&hostv1.FleetListVMsRequest{Hosts: hosts, TimeoutMs: timeout.Milliseconds()}))
			if err != nil {
				return callErr(err)
			}
			var outs []fleet.Outcome[[]fleet.VM]
			for _, h := range rsp.Msg.GetHosts() {
				o := fleet.Outcome[[]fleet.VM]{Host: h.GetHost(), Err: hostErr(h.GetError(), h.GetReachable())}
				for _, v := range h.GetVms() {
					o.Value = append(o.Value, fleet.VM{Name: v.GetName(), UUID: v.GetUuid(), State: runState(v.GetRunning()), TPM: transfersvc.TPMState(v)})
				}
				outs = append(outs, o)
			}
			r := fleet.Lists(outs, clirender.Error)
			if asJSON {
				if err := printJSON(cmd.OutOrStdout(), r); err != nil {
					return err
				}
			} else if err := r.WriteText(cmd.OutOrStdout()); err != nil {
				return err
			}
			return r.Summary.Err("vm list")
		},
	}
	hostsFlag(cmd, &hosts, &timeout)
	cmd.Flags().BoolP("all", "a", true, "every VM, running or not, and templates (always so with --hosts)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func hostsFlag(cmd *cobra.Command, hosts *string, timeout *time.Duration) {
	cmd.Flags().StringVar(hosts, "hosts", "", "all (this host and every trusted peer), or host names separated by commas")
	cmd.MarkFlagRequired("hosts")
	cmd.Flags().DurationVar(timeout, "timeout", fleet.DefaultTimeout, "how long each host gets to answer")
}

func runState(running bool) string {
	if running {
		return "running"
	}
	return "stopped"
}

// hostErr is a host's failure as the service reported it; an unreachable
// host's error says so even when its detail lost the kind.
func hostErr(d *hostv1.ErrorDetail, reachable bool) error {
	if d == nil {
		return nil
	}
	err := transfersvc.ErrorFrom(d)
	if !reachable && !fleet.Unreachable(err) {
		err = &fleet.UnreachableError{Host: d.GetHost(), Err: err}
	}
	return err
}

func tpmSwitchCmd(on bool) *cobra.Command {
	var hosts string
	var all, asJSON bool
	var timeout time.Duration
	verb := map[bool]string{true: "enable", false: "disable"}[on]
	cmd := &cobra.Command{
		Use:   verb + " --all --hosts all|A,B [--json]",
		Short: map[bool]string{true: "Attach", false: "Detach"}[on] + " the TPM of every VM on many hosts; unreachable hosts are reported, and any failure fails the command",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !all {
				return fmt.Errorf("--hosts acts on every VM of each host: give --all too")
			}
			rsp, err := hostd.DialFleet(apiSocket).SetTPMs(cmd.Context(), connect.NewRequest(&hostv1.FleetSetTPMsRequest{Enable: on, Hosts: hosts, TimeoutMs: timeout.Milliseconds()}))
			if err != nil {
				return callErr(err)
			}
			var outs []fleet.Outcome[vm.BulkResults]
			for _, h := range rsp.Msg.GetHosts() {
				outs = append(outs, fleet.Outcome[vm.BulkResults]{Host: h.GetHost(), Value: transfersvc.ResultsFrom(h.GetResults()), Err: hostErr(h.GetError(), h.GetReachable())})
			}
			r := fleet.Changes(outs, clirender.Error)
			if asJSON {
				if err := printJSON(cmd.OutOrStdout(), r); err != nil {
					return err
				}
			} else {
				r.WriteText(cmd.OutOrStdout(), clirender.Error)
			}
			return r.Summary.Err(verb + " TPMs")
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "every VM of each host (templates have no TPM; VMs without one are skipped)")
	hostsFlag(cmd, &hosts, &timeout)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
