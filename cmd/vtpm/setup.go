package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/manufacture"
	"vtpm/internal/paths"
	"vtpm/internal/swtpm"
)

const setupUsage = `TPM emulator setup tool version ` + swtpm.Version + ` (vtpm)
Usage: swtpm_setup [options]

vtpm manufactures the TPM in-process (no swtpm, swtpm_localca or certtool);
certificates come from this host's local CA (` + "`vtpm ca show --pem`" + `).

--tpm-state <dir>, --tpmstate <dir>
                 : Where the TPM's state is written (dir or dir://dir); mandatory
--tpm2           : Set up a TPM 2 (required: vtpm is TPM 2.0 only)
--createek       : Create the RSA-2048 and ECC EKs
--create-ek-cert : Create EK certificates; implies --createek
--create-platform-cert
                 : Create a platform certificate; implies --createek
--create-spk     : Create a storage primary key (RSA, or ECC with --ecc) at 0x81000001
--ecc-curve <c>  : ECC EK curve: p256 (default, NV 0x01c0000a) or p384 (as swtpm)
--lock-nvram     : Write-lock the certificate NV indices
--vmid <id>      : VM identifier, the certificates' subject CN
--logfile <file> : Log to this file (appended); default stdout/stderr
--keyfile <file>, --keyfile-fd <fd>, --pwdfile <file>, --pwdfile-fd <fd>
                 : Keep the state in swtpm's encrypted file format with this key
--cipher <c>     : aes-128-cbc (default) or aes-256-cbc
--overwrite      : Replace existing TPM state
--not-overwrite  : Keep existing TPM state and succeed
--pcr-banks <b>  : Active PCR banks, e.g. sha256 or sha1,sha256; '-' keeps all. Default: sha256
--rsa-keysize <n>: 2048 (or max)
--write-ek-cert-files <dir>
                 : Also write the certificates (DER) into dir
--reconfigure    : Change the PCR banks of existing state only
--runas <user>   : Leave the state owned by this user
--create-config-files [...]
                 : No-op: vtpm needs no configuration files
--print-capabilities, --version, --help
Accepted and ignored: --tpm, --swtpm_ioctl, --config, --display,
--tcsd-system-ps-file, --allow-signing, --decryption, --take-ownership,
--ownerpass, --owner-well-known, --srkpass, --srk-well-known
`

// runSwtpmSetup is `swtpm_setup …`; it returns the exit code. Its log goes
// to --logfile when given, else messages to stdout and errors to stderr.
func runSwtpmSetup(args []string, stdout, stderr io.Writer) int {
	o, err := swtpm.ParseSetup(args)
	if err != nil {
		fmt.Fprintf(stderr, "swtpm_setup: %v\n", err)
		fmt.Fprint(stdout, setupUsage)
		return 1
	}
	switch {
	case o.Help:
		fmt.Fprint(stdout, setupUsage)
		return 0
	case o.Version:
		fmt.Fprintf(stdout, "TPM emulator setup tool version %s, vtpm %s\n", swtpm.Version, version)
		return 0
	case o.PrintCaps:
		fmt.Fprintln(stdout, swtpm.SetupCapabilitiesJSON)
		return 0
	case o.CreateConfigFiles:
		return 0
	}
	if o.Logfile != "" && o.Logfile != "-" {
		f, err := os.OpenFile(o.Logfile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			fmt.Fprintf(stderr, "Could not open logfile %s: %v\n", o.Logfile, err)
			return 1
		}
		defer f.Close()
		stdout, stderr = f, f
	}
	info := func(format string, a ...any) { fmt.Fprintf(stdout, format+"\n", a...) }
	res, err := manufacture.SetupOn(o, setupHost(o), warnLogger())
	switch {
	case res.Kept:
		info("Not overwriting existing state file.")
		return 0
	case res.Started.IsZero():
		fmt.Fprintln(stderr, formatError(err))
		return 1
	}
	info("Starting vTPM manufacturing as %s @ %s", res.User, res.Started.Format(time.UnixDate))
	if rep := res.Report; rep != nil {
		for _, ek := range rep.EKs {
			kind := "ECC"
			if strings.HasPrefix(ek.Name, "RSA") {
				kind = ek.Name
			}
			info("Successfully created %s EK with handle %#x.", kind, uint32(ek.Handle))
			if ek.Cert != nil {
				info("Successfully created NVRAM area %#x for %s EK certificate.", uint32(ek.CertIndex), kind)
			}
		}
		if rep.PlatformCert != nil {
			info("Successfully created NVRAM area %#x for platform certificate.", uint32(manufacture.IndexPlatform))
		}
		if res.Banks != nil {
			info("Successfully activated PCR banks %s among %s.", strings.Join(rep.PCRBanks, ","), strings.Join(rep.Available, ","))
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, formatError(err))
		if res.Failed {
			fmt.Fprintln(stderr, "An error occurred. Authoring the TPM state failed.")
		}
	} else {
		info("Successfully authored TPM state.")
	}
	info("Ending vTPM manufacturing @ %s", res.Ended.Format(time.UnixDate))
	if err != nil {
		return 1
	}
	return 0
}

// setupHost is the host swtpm_setup manufactures with: the keystore of the
// host's data root (never one under an inherited $HOME: libvirt runs
// swtpm_setup as tss with HOME=/root), or, when this process cannot open
// it, the host service.
func setupHost(o *swtpm.SetupOptions) manufacture.OpenHost {
	return func() (manufacture.Host, error) {
		h, err := keybroker.Open(paths.HostDataRoot(), keystore.Options{HostTPM: os.Getenv("VTPM_HOST_TPM"), Logger: warnLogger()})
		if err == nil {
			return manufacture.FromBroker(func() (*keybroker.Broker, error) { return h, nil })()
		}
		if !hostsvc.UseService(err) {
			return nil, err
		}
		return &hostsvc.Keys{Dir: strings.TrimPrefix(o.StateDir, "dir://"), KeystoreErr: err}, nil
	}
}

func swtpmSetupCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "swtpm_setup [options]",
		Short: "Manufacture a vTPM with swtpm_setup's command line (drop-in for swtpm_setup)",
		Long: `Manufacture a vTPM in-process with swtpm_setup 0.7.1's command line, so libvirt
creates vTPMs through vtpm without knowing it. The binary behaves the same when
invoked under the name "swtpm_setup".`,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			os.Exit(runSwtpmSetup(args, cmd.OutOrStdout(), cmd.ErrOrStderr()))
			return nil
		},
	}
}
