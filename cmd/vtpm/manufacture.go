package main

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"vtpm/internal/keybroker"
	"vtpm/internal/manufacture"
	"vtpm/internal/seal"
	"vtpm/internal/state"
	"vtpm/internal/swtpm/statefile"
)

// mfgRequest is one manufacture (or PCR reconfiguration) of a state directory.
type mfgRequest struct {
	dir      string
	swtpmKey string // swtpm --key option text; selects swtpm's file format
	opts     manufacture.Options
	log      *slog.Logger
}

type mfgResult struct {
	report *manufacture.Report
	tpm    string
	format state.Format
}

// openState opens dir in the format `vtpm swtpm socket` will serve it in.
func openState(h *keybroker.Broker, dir, swtpmKey string, log *slog.Logger) (*state.Opened, error) {
	if state.Choose(dir, swtpmKey != "") == state.Swtpm {
		var key *statefile.Key
		if swtpmKey != "" {
			k, err := statefile.ParseKeyOption(swtpmKey)
			if err != nil {
				return nil, fmt.Errorf("state encryption key: %w", err)
			}
			key = k
		}
		return state.OpenSwtpm(dir, key, statefile.DefaultMode)
	}
	return state.OpenSealed(h, dir, log)
}

// runManufacture manufactures the TPM in r.dir in-process, with this host's CA.
func runManufacture(r mfgRequest) (*mfgResult, error) {
	h, err := openBroker()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	if r.opts.EKCerts || r.opts.PlatformCert {
		if r.opts.CA, err = manufacture.LoadCA(h.Keystore()); err != nil {
			return nil, err
		}
	}
	st, err := openState(h, r.dir, r.swtpmKey, r.log)
	if err != nil {
		return nil, err
	}
	defer st.Storage.Close()
	r.opts.Identity.TPM = st.TPM
	rep, err := manufacture.Manufacture(st.Storage, r.opts)
	if err != nil {
		return nil, err
	}
	return &mfgResult{report: rep, tpm: st.TPM.String(), format: st.Format}, nil
}

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
			if state.HasState(dir) {
				if !overwrite {
					return fmt.Errorf("%s already holds a TPM; nothing was changed (pass --overwrite to replace it with a new TPM, whose secrets are gone)", dir)
				}
				if err := state.Remove(dir); err != nil {
					return err
				}
			}
			o := manufacture.Options{
				RSA: !noRSA, ECC: c, EKCerts: !noCerts, PlatformCert: !noPlatform && !noCerts, Lock: !noLock,
				Identity: manufacture.Identity{VM: vmName, PlatformManufacturer: platMfr, PlatformModel: platModel, PlatformVersion: platVersion},
			}
			if banks != "-" {
				o.PCRBanks = strings.Split(banks, ",")
			}
			res, err := runManufacture(mfgRequest{dir: dir, opts: o, log: warnLogger()})
			if err != nil {
				return fmt.Errorf("manufacture %s: %w", dir, err)
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), reportJSON(res))
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "manufactured TPM %s in %s (%s state)\n", res.tpm, dir, res.format)
			for _, ek := range res.report.EKs {
				cert := "no certificate"
				if ek.Cert != nil {
					cert = fmt.Sprintf("certificate in NV %#x", uint32(ek.CertIndex))
				}
				fmt.Fprintf(w, "  EK %-10s %#x  %s\n", ek.Name, uint32(ek.Handle), cert)
			}
			if res.report.PlatformCert != nil {
				fmt.Fprintf(w, "  platform certificate in NV %#x\n", uint32(manufacture.IndexPlatform))
			}
			fmt.Fprintf(w, "  PCR banks: %s\n", strings.Join(res.report.PCRBanks, ","))
			return nil
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

type certJSON struct {
	Index     string    `json:"nv_index"`
	Subject   string    `json:"subject"`
	Issuer    string    `json:"issuer"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	TPM       string    `json:"tpm_uuid,omitempty"`
	Locked    bool      `json:"write_locked"`
	PEM       string    `json:"pem"`
}

type ekJSON struct {
	Name        string    `json:"name"`
	Handle      string    `json:"handle"`
	Fingerprint string    `json:"public_key_sha256"`
	PublicKey   string    `json:"public_key_pem"`
	Certificate *certJSON `json:"certificate,omitempty"`
}

func publicKeyInfo(pub crypto.PublicKey) (fingerprint, pemText string) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", ""
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

func certInfo(c *x509.Certificate, index uint32, locked bool) *certJSON {
	if c == nil {
		return nil
	}
	j := &certJSON{
		Index: fmt.Sprintf("%#x", index), Subject: c.Subject.String(), Issuer: c.Issuer.String(),
		Serial: c.SerialNumber.Text(16), NotBefore: c.NotBefore, NotAfter: c.NotAfter, Locked: locked,
		PEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})),
	}
	if id := manufacture.CertUUID(c); id != uuid.Nil {
		j.TPM = id.String()
	}
	return j
}

func reportJSON(r *mfgResult) map[string]any {
	var eks []ekJSON
	for _, ek := range r.report.EKs {
		fp, p := publicKeyInfo(ek.Public)
		e := ekJSON{Name: ek.Name, Handle: fmt.Sprintf("%#x", uint32(ek.Handle)), Fingerprint: fp, PublicKey: p}
		if ek.Cert != nil {
			c, _ := x509.ParseCertificate(ek.Cert)
			e.Certificate = certInfo(c, uint32(ek.CertIndex), false)
		}
		eks = append(eks, e)
	}
	return map[string]any{"tpm": r.tpm, "format": r.format, "eks": eks, "pcr_banks": r.report.PCRBanks, "platform_certificate": r.report.PlatformCert != nil}
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
			if !state.HasState(dir) {
				return fmt.Errorf("%s holds no TPM state; create one with `vtpm tpm manufacture %s`", dir, args[0])
			}
			out := map[string]any{"dir": dir}
			var info *manufacture.Info
			err := withHost(func(h *keybroker.Broker) error {
				st, err := openState(h, dir, key, warnLogger())
				if err != nil {
					return err
				}
				defer st.Storage.Close()
				out["format"] = st.Format
				if st.Store != nil {
					out["tpm"] = st.TPM.String()
					if g, err := st.Store.Generation("permall"); err == nil {
						out["generation"] = g
					}
				}
				info, err = manufacture.Inspect(st.Storage)
				return err
			})
			if errors.Is(err, seal.ErrLocked) {
				return fmt.Errorf("%s is in use by a running TPM; stop it to inspect it: %w", dir, err)
			}
			if err != nil {
				return err
			}
			var eks []ekJSON
			for _, ek := range info.EKs {
				fp, p := publicKeyInfo(ek.Public)
				eks = append(eks, ekJSON{ek.Name, fmt.Sprintf("%#x", uint32(ek.Handle)), fp, p, certInfo(ek.Cert, uint32(ek.CertIndex), ek.Locked)})
			}
			out["eks"] = eks
			if info.PlatformCert != nil {
				out["platform_certificate"] = certInfo(info.PlatformCert, uint32(manufacture.IndexPlatform), false)
			}
			out["pcr_banks"] = info.PCRBanks
			out["pcr_banks_available"] = info.Available
			type row struct {
				Name        string `json:"name"`
				Fingerprint string `json:"fingerprint"`
				Owner       bool   `json:"owner"`
			}
			var rows []row
			if p, err := keybroker.ReadProtector(dir); err == nil {
				for _, r := range p.Rows() {
					rows = append(rows, row{r.Name, r.Fingerprint, r.Fingerprint == p.Owner().Fingerprint()})
				}
				out["protector"] = rows
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), out)
			}
			w := cmd.OutOrStdout()
			if id, ok := out["tpm"]; ok {
				fmt.Fprintf(w, "TPM %s in %s (%s state, generation %v)\n", id, dir, out["format"], out["generation"])
			} else {
				fmt.Fprintf(w, "TPM in %s (%s state)\n", dir, out["format"])
			}
			for _, ek := range eks {
				fmt.Fprintf(w, "EK %s at %s, public key sha256 %s\n", ek.Name, ek.Handle, ek.Fingerprint)
				printCert(w, ek.Certificate)
			}
			if c, ok := out["platform_certificate"].(*certJSON); ok {
				fmt.Fprintln(w, "platform certificate:")
				printCert(w, c)
			}
			fmt.Fprintf(w, "PCR banks: %s (of %s)\n", strings.Join(info.PCRBanks, ","), strings.Join(info.Available, ","))
			for _, r := range rows {
				mark := ""
				if r.Owner {
					mark = "  (owner)"
				}
				fmt.Fprintf(w, "protector: %s  %s%s\n", r.Fingerprint, r.Name, mark)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().StringVar(&key, "key", "", "swtpm --key option for swtpm-format state encrypted with a key")
	return cmd
}

func printCert(w io.Writer, c *certJSON) {
	if c == nil {
		fmt.Fprintln(w, "  no certificate")
		return
	}
	lock := ""
	if c.Locked {
		lock = ", write-locked"
	}
	fmt.Fprintf(w, "  certificate in NV %s%s\n    subject: %s\n    issuer:  %s\n    valid:   %s to %s\n",
		c.Index, lock, c.Subject, c.Issuer, c.NotBefore.Format(time.DateOnly), c.NotAfter.Format(time.DateOnly))
}

func caCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "This host's local CA, which issues EK and platform certificates"}
	var asPEM bool
	show := &cobra.Command{
		Use:   "show [--pem]",
		Short: "Show the local CA (created on first use), or print its certificate as PEM for openssl verify -CAfile",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withHost(func(h *keybroker.Broker) error {
				ca, err := manufacture.LoadCA(h.Keystore())
				if err != nil {
					return err
				}
				if asPEM {
					_, err := cmd.OutOrStdout().Write(ca.PEM())
					return err
				}
				sum := sha256.Sum256(ca.Cert.Raw)
				fmt.Fprintf(cmd.OutOrStdout(), "subject:     %s\nsha256:      %s\nvalid:       %s to %s\n",
					ca.Cert.Subject, hex.EncodeToString(sum[:]), ca.Cert.NotBefore.Format(time.DateOnly), ca.Cert.NotAfter.Format(time.DateOnly))
				return nil
			})
		},
	}
	show.Flags().BoolVar(&asPEM, "pem", false, "print the CA certificate in PEM")
	cmd.AddCommand(show)
	return cmd
}
