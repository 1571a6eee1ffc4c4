package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/keybroker"
	"vtpm/internal/manufacture"
)

func tpmManufactureCmds() []*cobra.Command {
	return []*cobra.Command{tpmManufactureCmd(), tpmShowCmd()}
}

func tpmManufactureCmd() *cobra.Command {
	var (
		curve, banks, vmName, platMfr, platModel, platVersion string
		noRSA, noCerts, noPlatform, noLock, overwrite, asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "manufacture TPM-DIR",
		Short: "Manufacture a new vTPM: EKs, EK and platform certificates from this host's CA, PCR banks, NV locked",
		Long: `Manufacture a vTPM in TPM-DIR, in-process: an RSA-2048 EK at 0x81010001 and an
ECC EK (P-256 at 0x81010002 by default, or P-384 at 0x81010016 as swtpm makes
it), their certificates in NV 0x01c00002 / 0x01c0000a (0x01c00016), a platform
certificate in 0x01c08000, all issued by this host's local CA (see
` + "`vtpm ca show --pem`" + `), the chosen PCR banks, and the certificate indices
write-locked. The state is sealed; ` + "`vtpm swtpm socket --tpmstate dir=TPM-DIR`" + `
serves it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := tpmDir(args[0])
			c, err := manufacture.ParseCurve(curve)
			if err != nil {
				return err
			}
			o := manufacture.Options{
				RSA: !noRSA, ECC: c, EKCerts: !noCerts, PlatformCert: !noPlatform && !noCerts, Lock: !noLock,
				Identity: manufacture.Identity{VM: vmName, PlatformManufacturer: platMfr, PlatformModel: platModel, PlatformVersion: platVersion},
			}
			if banks != "-" {
				o.PCRBanks = strings.Split(banks, ",")
			}
			res, err := manufacture.Make(openBroker, dir, overwrite, o, warnLogger())
			if err != nil {
				return err
			}
			return emit(cmd, asJSON, res.Summary(), func(w io.Writer) { res.WriteText(w, dir) })
		},
	}
	f := cmd.Flags()
	f.StringVar(&curve, "ecc", "p256", "ECC EK curve: p256, p384 or none")
	f.BoolVar(&noRSA, "no-rsa", false, "do not create the RSA-2048 EK")
	f.BoolVar(&noCerts, "no-certs", false, "create EKs without certificates (and no platform certificate)")
	f.BoolVar(&noPlatform, "no-platform-cert", false, "do not create the platform certificate")
	f.BoolVar(&noLock, "no-lock", false, "leave the certificate NV indices writable with platform authorization")
	f.StringVar(&banks, "pcr-banks", "sha256", "active PCR banks, comma-separated (sha1,sha256,sha384,sha512); - keeps all")
	f.StringVar(&vmName, "vm-name", "", "VM name for the certificates' subject")
	f.StringVar(&platMfr, "platform-manufacturer", manufacture.DefaultPlatformManufacturer, "platform manufacturer in the platform certificate")
	f.StringVar(&platModel, "platform-model", manufacture.DefaultPlatformModel, "platform model in the platform certificate")
	f.StringVar(&platVersion, "platform-version", manufacture.DefaultPlatformVersion, "platform version in the platform certificate")
	f.BoolVar(&overwrite, "overwrite", false, "replace a TPM already in TPM-DIR by a new one")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func warnLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func tpmShowCmd() *cobra.Command {
	var asJSON bool
	var key string
	cmd := &cobra.Command{
		Use:   "show TPM-DIR",
		Short: "Show a vTPM: EKs, certificates, PCR banks, state generation and key protector",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := tpmDir(args[0])
			out, err := manufacture.Show(openBroker, dir, key, warnLogger())
			if err != nil {
				return err
			}
			return emit(cmd, asJSON, out, out.WriteText)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().StringVar(&key, "key", "", "swtpm --key option for swtpm-format state encrypted with a key")
	return cmd
}

func caCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "This host's local CA, which issues EK and platform certificates"}
	var asPEM bool
	show := &cobra.Command{
		Use:   "show [--pem]",
		Short: "Show the local CA (created on first use), or print its certificate as PEM for openssl verify -CAfile",
		Args:  cobra.NoArgs,
		RunE: onHost(func(cmd *cobra.Command, h *keybroker.Broker, args []string) error {
			ca, err := manufacture.LoadCA(h.Keystore())
			if err != nil {
				return err
			}
			if asPEM {
				_, err := cmd.OutOrStdout().Write(ca.PEM())
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "subject:     %s\nsha256:      %s\nvalid:       %s to %s\n",
				ca.Cert.Subject, ca.Fingerprint(), ca.Cert.NotBefore.Format(time.DateOnly), ca.Cert.NotAfter.Format(time.DateOnly))
			return nil
		}),
	}
	show.Flags().BoolVar(&asPEM, "pem", false, "print the CA certificate in PEM")
	cmd.AddCommand(show)
	return cmd
}
