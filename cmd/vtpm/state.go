package main

import (
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"

	"vtpm/internal/stateimport"
	"vtpm/internal/swtpm/statefile"
)

func stateCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "state",
		Short: "Manage TPM state directories",
	}
	cmd.AddCommand(stateImportCmd())
	return cmd
}

func stateImportCmd() *cobra.Command {
	var dest, key, dataKey string
	cmd := &cobra.Command{
		Use:   "import DIR",
		Short: "Convert a swtpm state directory into vtpm sealed state",
		Long: `Convert the swtpm state in DIR (tpm2-00.permall and, if present,
tpm2-00.volatilestate) into vtpm sealed state, so the VM keeps its TPM: the
same keys, NV indices and seeds.

If swtpm encrypted its state, give the same --key it ran with, in swtpm's
syntax: file=PATH|pwdfile=PATH|fd=N|pwdfd=N[,mode=aes-128-cbc|aes-256-cbc]
[,format=hex|binary][,kdf=pbkdf2|sha512]. The sealed state is encrypted with
the key from --data-key, or a new data key under a key protector owned by
this host's guardian.

By default the sealed state is written into DIR itself and the swtpm files
are then moved into DIR/swtpm-backup-<timestamp>/; with --dest it goes to
another directory and DIR is left as it is. Nothing is ever deleted or
overwritten: a destination that already holds sealed state is refused. No
TPM process may use DIR while it is imported.`,
		Example: `  vtpm state import /var/lib/libvirt/swtpm/<uuid>/tpm2
  vtpm state import --key pwdfile=/root/secret,mode=aes-256-cbc DIR
  vtpm state import --dest /var/lib/vtpm/vm1 DIR`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var fileKey *statefile.Key
			if key != "" {
				var err error
				if fileKey, err = statefile.ParseKeyOption(key); err != nil {
					return fmt.Errorf("--key: %w", err)
				}
				defer clear(fileKey.Bytes)
			}
			host, err := openBroker()
			if err != nil {
				return err
			}
			defer host.Close()
			res, err := stateimport.Import(stateimport.Options{
				Source:      args[0],
				Dest:        dest,
				FileKey:     fileKey,
				DataKey:     host.KeyFor(dataKey), // the new TPM's key and protector go into the staging directory
				Generations: host.Generations(),
				Logger:      slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelWarn})),
			})
			if res != nil {
				res.WriteText(cmd.OutOrStdout())
			}
			if err != nil {
				return fmt.Errorf("state import: %w", err)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dest, "dest", "", "write the sealed state into this directory instead of DIR (DIR stays untouched)")
	f.StringVar(&key, "key", "", "swtpm's --key for encrypted state, in swtpm's syntax (file=|pwdfile=|fd=|pwdfd=,mode=…)")
	f.StringVar(&dataKey, "data-key", "", "key for the sealed state: file=PATH|fd=N[,format=hex|binary] (default: a new key under a protector owned by this host)")
	return cmd
}
