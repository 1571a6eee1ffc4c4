package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/hostd"
	"vtpm/internal/migrate"
	"vtpm/internal/migrate/migrateapi"
	"vtpm/internal/paths"
	"vtpm/internal/progress"
	"vtpm/internal/vm"
)

func vmMigrateCmd() *cobra.Command {
	var to string
	var grant, asJSON bool
	cmd := &cobra.Command{
		Use:   "migrate VM --to HOST",
		Short: "Move a VM to a trusted host: live when it runs, offline otherwise",
		Long: `Move a running VM, with its vTPM, its disks and its firmware variables, to
HOST (a host this one trusts: vtpm host trust), while the guest runs. A VM
that is not running moves offline, as vm move does.

Both hosts check everything first, and nothing starts when either finds a
problem; each is reported with its fix. The destination's guardian must be
able to open the TPM's key protector: --grant admits it, as the protector's
owner (this host) can. Disks in the VM's bundle are copied while the guest
runs; disks outside it must be shared storage. The memory, the TPM's state
and the disks travel over TLS, authenticated by certificates issued under
each host's guardian.

On success the VM runs and is registered on HOST and is gone from here; its
TPM state stays here as a backup. On any failure the VM keeps running here
and HOST is cleaned up; the error names the step that failed.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return errors.New("--to HOST is required: the trusted host to migrate to (vtpm host list)")
			}
			// A stopped VM (or a template) has no memory to carry: it
			// moves offline, its bundle streamed as vm move does.
			h := vm.NewRegistry(paths.DataRoot(), nil)
			if v, err := h.Open(args[0]); err == nil && !h.State(v).Running() {
				if !asJSON {
					fmt.Fprintf(cmd.ErrOrStderr(), "VM %s is not running: moving it offline\n", v.Name())
				}
				return sendVM(cmd, &hostv1.SendVMRequest{Op: string(vm.OpMove), Vm: args[0], To: to, Grant: grant}, "moved", asJSON)
			}
			c := hostd.DialLocal(apiSocket)
			client := hostv1connect.NewLocalMigrationServiceClient(c.HTTP, c.Base)
			stream, err := client.Migrate(cmd.Context(), connect.NewRequest(&hostv1.MigrateRequest{Vm: args[0], To: to, Grant: grant}))
			if err != nil {
				return apierr.FromConnect(err, "")
			}
			defer stream.Close()
			out := cmd.OutOrStdout()
			pw := migrate.NewWriter(os.Stderr, asJSON, progress.IsTerminal(os.Stderr))
			if asJSON {
				pw = migrate.NewWriter(out, true, false)
			}
			var res *migrate.Result
			for stream.Receive() {
				switch ev := stream.Msg().GetEvent().(type) {
				case *hostv1.MigrateEvent_Progress:
					pw.Report(migrateapi.ProgressFromProto(ev.Progress))
				case *hostv1.MigrateEvent_Result:
					res = migrateapi.ResultFromProto(ev.Result)
				}
			}
			pw.Clear()
			if err := stream.Err(); err != nil {
				return apierr.FromConnect(err, "")
			}
			if res == nil {
				return errors.New("the host service ended the migration without a result")
			}
			if asJSON {
				return writeJSONLine(out, map[string]any{"result": res})
			}
			res.WriteText(out)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&to, "to", "", "the trusted host to migrate to")
	f.BoolVar(&grant, "grant", false, "admit HOST's guardian to the TPM's key protector when it is missing")
	f.BoolVar(&asJSON, "json", false, "progress and result as JSON, one object per line")
	return cmd
}

func writeJSONLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}
