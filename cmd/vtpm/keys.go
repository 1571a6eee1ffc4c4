package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/paths"
	"vtpm/internal/secretfile"
)

// openBroker opens this host's keystore with the configured host TPM.
func openBroker() (*keybroker.Broker, error) {
	return keybroker.Open(paths.DataRoot(), keystore.Options{
		HostTPM: os.Getenv("VTPM_HOST_TPM"),
		Logger:  warnLogger(),
	})
}

// onHost is a command's run function that runs with this host's keystore
// open.
func onHost(run func(cmd *cobra.Command, h *keybroker.Broker, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		return withHost(func(h *keybroker.Broker) error { return run(cmd, h, args) })
	}
}

// withHost runs f with this host's keystore open.
func withHost(f func(h *keybroker.Broker) error) error {
	h, err := openBroker()
	if err != nil {
		return err
	}
	defer h.Close()
	return f(h)
}

func printJSON(w io.Writer, v any) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(v)
}

// emit prints v as JSON when asJSON, else as text prints it.
func emit(cmd *cobra.Command, asJSON bool, v any, text func(w io.Writer)) error {
	if asJSON {
		return printJSON(cmd.OutOrStdout(), v)
	}
	text(cmd.OutOrStdout())
	return nil
}

func guardianCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "guardian", Short: "Manage the guardians (key sets that can open TPMs) this host holds"}
	var asJSON bool
	list := &cobra.Command{
		Use: "list", Short: "List this host's guardians", Args: cobra.NoArgs,
		RunE: onHost(func(cmd *cobra.Command, h *keybroker.Broker, args []string) error {
			out, err := h.GuardianSummaries()
			if err != nil {
				return err
			}
			return emit(cmd, asJSON, out, func(w io.Writer) {
				for _, g := range out {
					fmt.Fprintln(w, g.Line())
				}
			})
		}),
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")

	show := &cobra.Command{
		Use: "show [NAME|FINGERPRINT]", Short: "Show a guardian (default: this host's)", Args: cobra.MaximumNArgs(1),
		RunE: onHost(func(cmd *cobra.Command, h *keybroker.Broker, args []string) error {
			g, local, err := h.Pick(argOr(args, 0))
			if err != nil {
				return err
			}
			return emit(cmd, asJSON, keybroker.Summarize(g, local), func(w io.Writer) {
				c := g.SigningCertificate()
				fmt.Fprintf(w, "name:        %s\nfingerprint: %s\nsubject:     %s\nkem:         %s\nvalid:       %s to %s\nprivate key: %v\n",
					g.Name(), g.Fingerprint(), g.Subject(), g.KEM(), c.NotBefore.Format(time.DateOnly), c.NotAfter.Format(time.DateOnly), g.HasPrivate())
			})
		}),
	}
	show.Flags().BoolVar(&asJSON, "json", false, "print JSON")

	var out, pwFile string
	var certsOnly bool
	export := &cobra.Command{
		Use:   "export [NAME|FINGERPRINT] -o FILE",
		Short: "Export a guardian as password-protected PKCS#12 (private key included), or its certificates only",
		Args:  cobra.MaximumNArgs(1),
		RunE: onHost(func(cmd *cobra.Command, h *keybroker.Broker, args []string) error {
			b, perm, err := h.ExportGuardian(argOr(args, 0), certsOnly, func() (string, error) {
				if out == "" {
					return "", errors.New("a PKCS#12 export holds a private key: give -o FILE")
				}
				return secretfile.Read(pwFile, "VTPM_PASSWORD", "password")
			})
			if err != nil {
				return err
			}
			return secretfile.Create(out, b, perm, cmd.OutOrStdout())
		}),
	}
	export.Flags().StringVarP(&out, "output", "o", "", "file to write (certificates only: - for stdout)")
	export.Flags().StringVar(&pwFile, "password-file", "", "file holding the PKCS#12 password (or set VTPM_PASSWORD)")
	export.Flags().BoolVar(&certsOnly, "certs-only", false, "export the public certificates only (PEM), enough for another host to grant this guardian")

	var replace bool
	imp := &cobra.Command{
		Use: "import FILE", Short: "Import a guardian from a PKCS#12 file", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			data, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			pw, err := secretfile.Read(pwFile, "VTPM_PASSWORD", "password")
			if err != nil {
				return err
			}
			return withHost(func(h *keybroker.Broker) error {
				g, err := h.ImportPKCS12(args[0], data, pw, replace)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "imported guardian %s (%s)\n", g.Name(), g.Fingerprint())
				return nil
			})
		},
	}
	imp.Flags().StringVar(&pwFile, "password-file", "", "file holding the PKCS#12 password (or set VTPM_PASSWORD)")
	imp.Flags().BoolVar(&replace, "replace", false, "overwrite a guardian already present")

	remove := &cobra.Command{
		Use: "remove NAME|FINGERPRINT", Short: "Remove a guardian from this host", Args: cobra.ExactArgs(1),
		RunE: onHost(func(cmd *cobra.Command, h *keybroker.Broker, args []string) error {
			g, err := h.Remove(args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed guardian %s (%s)\n", g.Name(), g.Fingerprint())
			return nil
		}),
	}
	cmd.AddCommand(list, show, export, imp, remove, trustCmd(), untrustCmd())
	return cmd
}

// argOr is args[i], or "" when there are fewer arguments.
func argOr(args []string, i int) string {
	if i < len(args) {
		return args[i]
	}
	return ""
}

func protectorCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "protector", Short: "Show and change which guardians may open a TPM"}
	var asJSON bool
	show := &cobra.Command{
		Use: "show VM|TPM-DIR", Short: "Show a TPM's key protector", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := keybroker.ReadProtector(tpmDir(args[0]))
			if err != nil {
				return err
			}
			s := keybroker.SummarizeProtector(p)
			return emit(cmd, asJSON, s, s.WriteText)
		},
	}
	show.Flags().BoolVar(&asJSON, "json", false, "print JSON")

	var keyService string
	grant := &cobra.Command{
		Use:   "grant VM|TPM-DIR CERTS.pem | grant VM|TPM-DIR --key-service URL",
		Short: "Allow a guardian, given by its public certificates, to open a TPM (needs the owner's key)",
		Long: `Allow a guardian, given by its public certificates, to open a TPM (needs the
owner's key). With --key-service URL[,URL…] the guardian is the key service's
fleet guardian, asked of the key service with this host's client bundle (by
vtpm-hostd): any host the key service has registered and attested may then
get the TPM's key from it.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if keyService != "" {
				return cobra.ExactArgs(1)(cmd, args)
			}
			return cobra.ExactArgs(2)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			var g *guardian.Guardian
			var err error
			if keyService != "" {
				g, err = fleetGuardian(keyService)
			} else {
				g, err = guardian.ReadCertificates(args[1])
			}
			if err != nil {
				return err
			}
			return withHost(func(h *keybroker.Broker) error {
				p, err := h.Grant(tpmDir(args[0]), g)
				return printChanged(cmd.OutOrStdout(), p, err, "granted "+g.Name(), "")
			})
		},
	}
	grant.Flags().StringVar(&keyService, "key-service", "", "grant the fleet guardian of the key service at these URLs (comma-separated) instead of CERTS.pem")
	revoke := &cobra.Command{
		Use:   "revoke VM|TPM-DIR NAME|FINGERPRINT",
		Short: "Stop a guardian from opening a TPM for good: re-keys the TPM, which must be stopped (needs the owner's key)",
		Args:  cobra.ExactArgs(2),
		RunE: onHost(func(cmd *cobra.Command, h *keybroker.Broker, args []string) error {
			p, err := h.Revoke(tpmDir(args[0]), args[1])
			return printChanged(cmd.OutOrStdout(), p, err, "revoked "+args[1], "; re-keyed it: keys exported before no longer open it")
		}),
	}
	cmd.AddCommand(show, grant, revoke)
	return cmd
}

func printChanged(w io.Writer, p *guardian.Protector, err error, done, note string) error {
	if err == nil {
		fmt.Fprintf(w, "%s for TPM %s (protector version %d)%s\n", done, p.TPM(), p.Version(), note)
	}
	return err
}

func keyCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "key", Short: "Export and import a TPM's data key as a passphrase-protected file"}
	var out, ppFile string
	export := &cobra.Command{
		Use: "export VM|TPM-DIR -o FILE", Short: "Export a TPM's data key (Argon2id + AES-GCM)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return errors.New("give -o FILE")
			}
			pp, err := secretfile.Read(ppFile, "VTPM_PASSPHRASE", "passphrase")
			if err != nil {
				return err
			}
			return withHost(func(h *keybroker.Broker) error {
				id, b, err := h.ExportKey(tpmDir(args[0]), pp)
				if err != nil {
					return err
				}
				if err := secretfile.Create(out, b, 0o600, cmd.OutOrStdout()); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "exported the key of TPM %s to %s\n", id, out)
				return nil
			})
		},
	}
	export.Flags().StringVarP(&out, "output", "o", "", "file to write")
	export.Flags().StringVar(&ppFile, "passphrase-file", "", "file holding the passphrase (or set VTPM_PASSPHRASE)")

	var replace bool
	imp := &cobra.Command{
		Use: "import FILE", Short: "Import a TPM's data key so this host can open that TPM", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			data, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			pp, err := secretfile.Read(ppFile, "VTPM_PASSPHRASE", "passphrase")
			if err != nil {
				return err
			}
			return withHost(func(h *keybroker.Broker) error {
				id, err := h.ImportKeyFile(args[0], data, pp, replace)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "imported the key of TPM %s\n", id)
				return nil
			})
		},
	}
	imp.Flags().StringVar(&ppFile, "passphrase-file", "", "file holding the passphrase (or set VTPM_PASSPHRASE)")
	imp.Flags().BoolVar(&replace, "replace", false, "overwrite a different key already held for the same TPM")
	cmd.AddCommand(export, imp)
	return cmd
}

// tpmDir resolves a TPM argument: a state directory, or a registered VM.
func tpmDir(arg string) string { return vmRegistry().TPMDir(arg) }
