package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/errdefs"
	"vtpm/internal/vm"
)

// Commands that act on other hosts are vtpm-hostd's: vtpm forwards `vm
// move` and `vm copy` always, and a local command when it is given one of
// the flags that reach other hosts (--hosts, --on).

// onOtherHosts adds the flags that make c act on other hosts (hosts:
// --hosts and --timeout; on: --on) and forwards c to vtpm-hostd when one
// is given.
func onOtherHosts(c *cobra.Command, flags ...string) *cobra.Command {
	for _, f := range flags {
		switch f {
		case "hosts":
			c.Flags().String("hosts", "", "act on these hosts: all (this host and every trusted peer), or names separated by commas")
			c.Flags().Duration("timeout", 30*time.Second, "with --hosts: how long each host gets to answer")
		case "on":
			c.Flags().String("on", "", "make it on this trusted host, through the host service")
		}
	}
	run := c.RunE
	c.RunE = func(cmd *cobra.Command, args []string) error {
		for _, f := range flags {
			if cmd.Flags().Changed(f) {
				return forward(hostHelper, os.Args[1:])
			}
		}
		return run(cmd, args)
	}
	return c
}

func vmMoveCmd() *cobra.Command {
	return forwardCmd(hostHelper, "move VM --to HOST", "Move a stopped VM or template to a trusted host: same name, UUID and TPM")
}

func vmCopyToCmd() *cobra.Command {
	return forwardCmd(hostHelper, "copy VM --to HOST [--name NEW] [--tpm new|copy|none]",
		"Copy a stopped VM or template to a trusted host, as vm clone does: its own UUID, a new, copied or no TPM")
}

// withPurge makes the delete command c, given --purge-backup, delete the
// VM when it is registered here and then remove the backups of its TPM
// state; a VM no longer registered (moved to another host) has only its
// backups removed.
func withPurge(c *cobra.Command, purge, yes *bool) {
	run := c.RunE
	c.RunE = func(cmd *cobra.Command, args []string) error {
		if !*purge {
			return run(cmd, args)
		}
		h := vmRegistry()
		_, err := h.Find(args[0])
		registered := err == nil
		if err != nil && !errors.Is(err, vm.ErrNotFound) {
			return err
		}
		bs, err := h.Backups(args[0])
		if err != nil {
			return err
		}
		if !registered && len(bs) == 0 {
			return errdefs.New(errdefs.ErrNotFound, "no VM %s on this host, and no backup of its TPM state in %s", args[0], h.BackupsDir())
		}
		q := fmt.Sprintf("remove the backups of VM %s's TPM state for good (%d kept)", args[0], len(bs))
		if registered {
			q = fmt.Sprintf("delete VM %s and every backup of its TPM state for good", args[0])
		}
		if err := confirm(cmd.InOrStdin(), cmd.ErrOrStderr(), q, *yes); err != nil {
			return err
		}
		*yes = true // asked once
		if registered {
			if err := run(cmd, args); err != nil {
				return err
			}
		}
		gone, err := h.PurgeBackups(args[0])
		for _, b := range gone {
			fmt.Fprintf(cmd.OutOrStdout(), "removed the backup of VM %s's TPM state in %s\n", b.VM, b.Dir)
		}
		return err
	}
}
