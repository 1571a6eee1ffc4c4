package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"vtpm/internal/attest"
	"vtpm/internal/attest/tpmmode"
	"vtpm/internal/errdefs"
	"vtpm/internal/keyservice"
)

// hostTPMFlags adds the flags that say which TPM and event log this host
// attests with: --tpm (else $VTPM_HOST_TPM, else /dev/tpmrm0), --event-log,
// --ek-type. The options are read when the command runs.
func hostTPMFlags(cmd *cobra.Command) func() attest.HostOptions {
	o := &attest.HostOptions{}
	f := cmd.Flags()
	f.StringVar(&o.TPM, "tpm", "", "the host TPM: device:PATH, tcp:HOST:PORT or unix:PATH (default $VTPM_HOST_TPM, else "+attest.DefaultTPM+")")
	f.StringVar(&o.EventLog, "event-log", "", "the measured-boot event log (default "+attest.DefaultEventLog+")")
	f.StringVar((*string)(&o.EK), "ek-type", string(attest.EKRSA), "the endorsement key: rsa (RSA 2048) or ecc (P-256)")
	return func() attest.HostOptions {
		out := *o
		if out.TPM == "" {
			out.TPM = os.Getenv("VTPM_HOST_TPM")
		}
		return out
	}
}

// policyCaptureCmd captures an attestation policy from a reference host:
// run on that host, it attests the host to itself and stores (or adds to)
// the policy with the PCR values it proved.
func policyCaptureCmd() *cobra.Command {
	var class, out string
	var replace bool
	cmd := &cobra.Command{
		Use:   "capture NAME --class CLASS",
		Short: "Capture an attestation policy from this host's boot (a reference host, Secure Boot on)",
		Long: `Run on a reference host of a hardware class, booted as the fleet's hosts of
that class boot, with Secure Boot on. The host's TPM quotes PCRs 0-7, the
measured-boot event log is replayed against the quote, and the proven values
become an accepted boot of CLASS in policy NAME, which is created or, unless
--replace, added to. With -o the policy is written to a file (the format of
policy set) instead of the key service.`,
		Args: cobra.ExactArgs(1),
	}
	hostOpts := hostTPMFlags(cmd)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		p, err := attest.CaptureHost(hostOpts(), args[0], class)
		if err != nil {
			return err
		}
		if out != "" {
			f, err := os.Create(out)
			if err != nil {
				return errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "write policy %s", p.Name)
			}
			if err := printJSON(f, keyservice.PolicyToProto(*tpmmode.ToVerify(p))); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "policy %s (class %s) written to %s\n", p.Name, class, out)
			return nil
		}
		c, err := connect(cmd.Flag("bundle").Value.String())
		if err != nil {
			return err
		}
		ctx, cancel := timeout()
		defer cancel()
		if !replace {
			ps, err := c.ListPolicies(ctx)
			if err != nil {
				return err
			}
			for _, m := range ps {
				if m.GetName() == p.Name {
					vp := keyservice.PolicyFromProto(m)
					old := tpmmode.FromVerify(&vp)
					old.Merge(p)
					p = old
				}
			}
		}
		if err := c.SetPolicy(ctx, keyservice.PolicyToProto(*tpmmode.ToVerify(p))); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "policy %s stored (%s)\n", p.Name, p)
		return nil
	}
	bundleFlag(cmd)
	f := cmd.Flags()
	f.StringVar(&class, "class", "", "the hardware class this host stands for")
	f.StringVarP(&out, "output", "o", "", "write the policy to this file instead of storing it")
	f.BoolVar(&replace, "replace", false, "replace the policy instead of adding this boot to it")
	cmd.MarkFlagRequired("class")
	return cmd
}

// hostEKCmd prints the host TPM's endorsement key, for host add --ek.
func hostEKCmd() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "ek",
		Short: "Print this host's TPM endorsement key (PEM), to register the host in tpm mode",
		Args:  cobra.NoArgs,
	}
	hostOpts := hostTPMFlags(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		h, err := attest.OpenHost(hostOpts())
		if err != nil {
			return err
		}
		defer h.Close()
		ek, err := h.EK()
		if err != nil {
			return err
		}
		b, err := attest.MarshalEK(ek)
		if err != nil {
			return err
		}
		if out == "" {
			_, err = cmd.OutOrStdout().Write(b)
			return err
		}
		if err := os.WriteFile(out, b, 0o644); err != nil {
			return errdefs.Wrap(errdefs.ErrFailedPrecondition, err, "write the endorsement key")
		}
		fmt.Fprintf(cmd.OutOrStdout(), "endorsement key %s written to %s\n", attest.EKFingerprint(ek), out)
		return nil
	}
	cmd.Flags().StringVarP(&out, "output", "o", "", "write it to this file")
	return cmd
}
