package main

import (
	"os"
	"time"

	"github.com/spf13/cobra"
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
