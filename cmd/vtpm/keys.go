package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/paths"
	"vtpm/internal/seal"
)

// openBroker opens this host's keystore with the configured host TPM.
func openBroker() (*keybroker.Broker, error) {
	return keybroker.Open(paths.DataRoot(), keystore.Options{
		HostTPM: os.Getenv("VTPM_HOST_TPM"),
		Logger:  slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
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

// readSecret reads a password or passphrase from a file (the whole first
// line), or from the named environment variable.
func readSecret(file, env, what string) (string, error) {
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("read %s file: %w", what, err)
		}
		s, _, _ := strings.Cut(string(b), "\n")
		return s, nil
	}
	if s := os.Getenv(env); s != "" {
		return s, nil
	}
	return "", fmt.Errorf("no %s: give --%s-file FILE or set %s", what, what, env)
}

func writeOut(path string, data []byte, perm os.FileMode) error {
	if path == "" || path == "-" {
		_, err := os.Stdout.Write(data)
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s already exists; choose another name (nothing was overwritten)", path)
	}
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

type guardianInfo struct {
	Name        string `json:"name"`
	Fingerprint string `json:"fingerprint"`
	Subject     string `json:"subject"`
	KEM         string `json:"kem"`
	Local       bool   `json:"local"`
}

func infoOf(g *guardian.Guardian, local bool) guardianInfo {
	return guardianInfo{g.Name(), g.Fingerprint(), g.Subject(), fmt.Sprint(g.KEM()), local}
}

func printJSON(w io.Writer, v any) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(v)
}

func guardianCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "guardian", Short: "Manage the guardians (key sets that can open TPMs) this host holds"}
	var asJSON bool
	list := &cobra.Command{
		Use: "list", Short: "List this host's guardians", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withHost(func(h *keybroker.Broker) error {
				gs, err := h.Guardians()
				if err != nil {
					return err
				}
				var out []guardianInfo
				for i, g := range gs {
					out = append(out, infoOf(g, i == 0))
				}
				if asJSON {
					return printJSON(cmd.OutOrStdout(), out)
				}
				for _, g := range out {
					mark := ""
					if g.Local {
						mark = "  (this host)"
					}
					fmt.Fprintf(cmd.OutOrStdout(), "%s  %s  %s%s\n", g.Fingerprint[:16], g.KEM, g.Name, mark)
				}
				return nil
			})
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")

	show := &cobra.Command{
		Use: "show [NAME|FINGERPRINT]", Short: "Show a guardian (default: this host's)", Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withHost(func(h *keybroker.Broker) error {
				g, local, err := pick(h, args)
				if err != nil {
					return err
				}
				if asJSON {
					return printJSON(cmd.OutOrStdout(), infoOf(g, local))
				}
				c := g.SigningCertificate()
				fmt.Fprintf(cmd.OutOrStdout(), "name:        %s\nfingerprint: %s\nsubject:     %s\nkem:         %s\nvalid:       %s to %s\nprivate key: %v\n",
					g.Name(), g.Fingerprint(), g.Subject(), g.KEM(), c.NotBefore.Format(time.DateOnly), c.NotAfter.Format(time.DateOnly), g.HasPrivate())
				return nil
			})
		},
	}
	show.Flags().BoolVar(&asJSON, "json", false, "print JSON")

	var out, pwFile string
	var certsOnly bool
	export := &cobra.Command{
		Use:   "export [NAME|FINGERPRINT] -o FILE",
		Short: "Export a guardian as password-protected PKCS#12 (private key included), or its certificates only",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withHost(func(h *keybroker.Broker) error {
				g, _, err := pick(h, args)
				if err != nil {
					return err
				}
				if certsOnly {
					b, err := g.ExportCertificates()
					if err != nil {
						return err
					}
					return writeOut(out, b, 0o644)
				}
				if out == "" {
					return errors.New("a PKCS#12 export holds a private key: give -o FILE")
				}
				pw, err := readSecret(pwFile, "VTPM_PASSWORD", "password")
				if err != nil {
					return err
				}
				b, err := g.ExportPKCS12(pw)
				if err != nil {
					return err
				}
				return writeOut(out, b, 0o600)
			})
		},
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
			pw, err := readSecret(pwFile, "VTPM_PASSWORD", "password")
			if err != nil {
				return err
			}
			g, err := guardian.ImportPKCS12(data, pw)
			if err != nil {
				return fmt.Errorf("import %s: %w", args[0], err)
			}
			return withHost(func(h *keybroker.Broker) error {
				if err := h.Import(g, replace); err != nil {
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
		RunE: func(cmd *cobra.Command, args []string) error {
			return withHost(func(h *keybroker.Broker) error {
				g, err := h.Remove(args[0])
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "removed guardian %s (%s)\n", g.Name(), g.Fingerprint())
				return nil
			})
		},
	}
	cmd.AddCommand(list, show, export, imp, remove)
	return cmd
}

func pick(h *keybroker.Broker, args []string) (*guardian.Guardian, bool, error) {
	local, err := h.Local()
	if err != nil || len(args) == 0 {
		return local, true, err
	}
	g, err := h.Find(args[0])
	if err != nil {
		return nil, false, err
	}
	return g, g.Fingerprint() == local.Fingerprint(), nil
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
			type row struct {
				Name, Fingerprint, Subject string
				Owner                      bool
			}
			var rows []row
			for _, r := range p.Rows() {
				rows = append(rows, row{r.Name, r.Fingerprint, r.Subject, r.Fingerprint == p.Owner().Fingerprint()})
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), map[string]any{"tpm": p.TPM(), "owner": p.Owner().Fingerprint(), "rows": rows})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "TPM %s, owner %s (%s)\n", p.TPM(), p.Owner().Name(), p.Owner().Fingerprint())
			for _, r := range rows {
				mark := ""
				if r.Owner {
					mark = "  (owner)"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "  %s  %s%s\n", r.Fingerprint, r.Name, mark)
			}
			return nil
		},
	}
	show.Flags().BoolVar(&asJSON, "json", false, "print JSON")

	grant := &cobra.Command{
		Use:   "grant VM|TPM-DIR CERTS.pem",
		Short: "Allow a guardian, given by its public certificates, to open a TPM (needs the owner's key)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			pem, err := os.ReadFile(args[1])
			if err != nil {
				return err
			}
			g, err := guardian.ParseCertificates(pem)
			if err != nil {
				return fmt.Errorf("%s: %w", args[1], err)
			}
			return changeProtector(tpmDir(args[0]), func(p *guardian.Protector, key *keybroker.Key, owner *guardian.Guardian) error {
				return key.Grant(p, g, owner)
			}, cmd.OutOrStdout(), "granted "+g.Name())
		},
	}
	revoke := &cobra.Command{
		Use:   "revoke VM|TPM-DIR NAME|FINGERPRINT",
		Short: "Stop a guardian from opening a TPM (needs the owner's key)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := tpmDir(args[0])
			p, err := keybroker.ReadProtector(dir)
			if err != nil {
				return err
			}
			var fps []string
			for _, r := range p.Rows() {
				if r.Name == args[1] || r.Fingerprint == args[1] || (len(args[1]) >= 8 && strings.HasPrefix(r.Fingerprint, args[1])) {
					fps = append(fps, r.Fingerprint)
				}
			}
			if len(fps) == 0 {
				return fmt.Errorf("no guardian %q in the protector of %s; `vtpm protector show %s` lists them", args[1], dir, args[0])
			}
			if len(fps) > 1 {
				return fmt.Errorf("%q names %d guardians in the protector of %s; give a fingerprint (`vtpm protector show %s` lists them)", args[1], len(fps), dir, args[0])
			}
			fp := fps[0]
			return changeProtector(dir, func(p *guardian.Protector, _ *keybroker.Key, owner *guardian.Guardian) error {
				return p.Revoke(fp, owner)
			}, cmd.OutOrStdout(), "revoked "+args[1])
		},
	}
	cmd.AddCommand(show, grant, revoke)
	return cmd
}

// changeProtector opens dir's TPM, checks this host holds the owner's key,
// applies change and writes the protector back.
func changeProtector(dir string, change func(*guardian.Protector, *keybroker.Key, *guardian.Guardian) error, w io.Writer, done string) error {
	return withHost(func(h *keybroker.Broker) error {
		p, err := keybroker.ReadProtector(dir)
		if err != nil {
			return err
		}
		owner, err := h.Find(p.Owner().Fingerprint())
		if err != nil {
			return fmt.Errorf("only the owner of TPM %s, guardian %s (%s), can change its protector; run this on a host that holds it", p.TPM(), p.Owner().Name(), p.Owner().Fingerprint())
		}
		o, err := h.OpenTPM(dir)
		if err != nil {
			return err
		}
		defer o.Close()
		if err := change(p, o.Key, owner); err != nil {
			return err
		}
		if err := keybroker.WriteProtector(dir, p); err != nil {
			return err
		}
		fmt.Fprintf(w, "%s for TPM %s\n", done, p.TPM())
		return nil
	})
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
			pp, err := readSecret(ppFile, "VTPM_PASSPHRASE", "passphrase")
			if err != nil {
				return err
			}
			dir := tpmDir(args[0])
			if !seal.Exists(dir) {
				// OpenTPM would provision a new TPM there and export its key.
				return fmt.Errorf("%s holds no vtpm TPM state (no %s); nothing was exported", dir, seal.StateFileName)
			}
			return withHost(func(h *keybroker.Broker) error {
				o, err := h.OpenTPM(dir)
				if err != nil {
					return err
				}
				defer o.Close()
				b, err := o.Key.Export(pp, time.Now())
				if err != nil {
					return err
				}
				if err := writeOut(out, b, 0o600); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "exported the key of TPM %s to %s\n", o.TPM, out)
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
			pp, err := readSecret(ppFile, "VTPM_PASSPHRASE", "passphrase")
			if err != nil {
				return err
			}
			return withHost(func(h *keybroker.Broker) error {
				id, err := h.ImportKeyFile(data, pp, replace)
				var kf *keybroker.KeyFileError
				if errors.As(err, &kf) {
					return fmt.Errorf("%s: %w", args[0], kf.Err)
				}
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

// tpmDir resolves a TPM argument to its state directory: a path to one, or
// the name or UUID of a registered VM (its bundle's tpm/).
func tpmDir(arg string) string {
	if strings.ContainsRune(arg, os.PathSeparator) || arg == "." || arg == ".." {
		return arg
	}
	if st, err := os.Stat(arg); err == nil && st.IsDir() {
		return arg
	}
	if v, err := vmRegistry().Open(arg); err == nil {
		return v.TPMDir()
	}
	return arg
}
