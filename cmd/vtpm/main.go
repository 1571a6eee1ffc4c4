// Command vtpm is a virtual TPM 2.0 for virtual machines. Invoked as "swtpm"
// it is a drop-in for swtpm's socket interface.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"vtpm/internal/libtpms"
	"vtpm/internal/sandbox"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	// A cgo program: the sandbox reaches every thread through libtpms' C.
	sandbox.UseAllThreads(libtpms.AllThreadsSyscall)
	if filepath.Base(os.Args[0]) == "swtpm" {
		os.Exit(runSwtpm(os.Args[1:], os.Stdout, os.Stderr))
	}
	// A vTPM starts with every VM: it skips building the command tree
	// (swtpmCmd passes its arguments through unparsed, as here).
	if len(os.Args) > 1 && os.Args[1] == "swtpm" {
		os.Exit(runSwtpm(os.Args[2:], os.Stdout, os.Stderr))
	}
	if filepath.Base(os.Args[0]) == "swtpm_setup" {
		os.Exit(runSwtpmSetup(os.Args[1:], os.Stdout, os.Stderr))
	}
	if err := rootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "vtpm:", formatError(err))
		os.Exit(1)
	}
}

func rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "vtpm",
		Short:         "A virtual TPM 2.0 for virtual machines",
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(swtpmCmd(), swtpmSetupCmd(), caCmd())
	root.AddCommand(stateCmd(), guardianCmd(), protectorCmd(), keyCmd(), tpmCmd())
	root.AddCommand(doctorCmd())
	root.AddCommand(vmCmd(), hostCmd())
	// The key service links etcd; its commands run in vtpm-keyservice.
	root.AddCommand(forwardCmd("vtpm-keyservice", "keyservice", "The key service: fleet guardian, hosts, attestation, key release, audit"))
	return root
}
