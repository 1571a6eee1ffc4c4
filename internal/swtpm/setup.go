package swtpm

import (
	"errors"
	"io"
	"strings"

	"github.com/spf13/pflag"
)

// SetupOptions is a parsed swtpm_setup 0.7.1 command line.
type SetupOptions struct {
	StateDir     string // --tpm-state/--tpmstate: dir, dir://dir or file://…
	VMID         string
	Logfile      string
	RunAs        string
	TPM2         bool
	CreateEK     bool // --createek, implied by --take-ownership and the certificate options
	EKCert       bool
	PlatformCert bool
	LockNV       bool
	CreateSPK    bool
	ECC          bool // --ecc: the SPK is an ECC key
	Overwrite    bool
	NotOverwrite bool
	Reconfigure  bool
	AllowSigning bool
	Decryption   bool
	PCRBanks     string
	PCRBanksSet  bool
	RSAKeySize   string
	KeyFile      string
	KeyFileFD    string
	PwdFile      string
	PwdFileFD    string
	Cipher       string
	// WriteEKCertFiles is a directory to write the certificates into (DER).
	WriteEKCertFiles  string
	PrintCaps         bool
	Version           bool
	Help              bool
	CreateConfigFiles bool
	ECCCurve          string // vtpm extension: p256 (default) or p384
}

// SetupCapabilitiesJSON is swtpm_setup's --print-capabilities answer for what
// vtpm does: TPM 2.0 only, RSA-2048 EKs.
const SetupCapabilitiesJSON = `{ "type": "swtpm_setup", "features": [ "tpm-2.0", "cmdarg-keyfile-fd", "cmdarg-pwdfile-fd", "cmdarg-write-ek-cert-files", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks", "tpm2-rsa-keysize-2048" ], "version": "` + Version + `" }`

// SetupOptionsUsage lists the options ParseSetup accepts, for --help.
const SetupOptionsUsage = `--tpm-state <dir>, --tpmstate <dir>
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

// present is the value pflag gives a switch named without a value; any other
// value (--tpm2=true) is refused, as getopt_long refuses it.
const present = "\x00"

// switchValue is an option without an argument.
type switchValue struct{ p *bool }

func (s switchValue) String() string { return "" }
func (s switchValue) Type() string   { return "switch" }
func (s switchValue) Set(v string) error {
	if v != present {
		return errors.New("doesn't allow an argument")
	}
	*s.p = true
	return nil
}

// ParseSetup parses swtpm_setup's arguments as getopt_long does for it:
// arguments that are not options are ignored, and only -h has a short form.
// Errors are *UsageError with getopt's messages.
func ParseSetup(args []string) (*SetupOptions, error) {
	o := &SetupOptions{Cipher: "aes-128-cbc", RSAKeySize: "2048", ECCCurve: "p256"}
	fs := pflag.NewFlagSet("swtpm_setup", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var createEK, takeOwnership, ignored bool
	var configFiles string
	switches := map[string]*bool{
		"tpm2": &o.TPM2, "ecc": &o.ECC, "createek": &createEK, "create-spk": &o.CreateSPK,
		"take-ownership": &takeOwnership, "create-ek-cert": &o.EKCert, "create-platform-cert": &o.PlatformCert,
		"lock-nvram": &o.LockNV, "overwrite": &o.Overwrite, "not-overwrite": &o.NotOverwrite,
		"allow-signing": &o.AllowSigning, "decryption": &o.Decryption, "version": &o.Version,
		"print-capabilities": &o.PrintCaps, "reconfigure": &o.Reconfigure, "help": &o.Help,
		// TPM 1.2 and external-tool options: accepted; vtpm needs none of them.
		"owner-well-known": &ignored, "srk-well-known": &ignored, "display": &ignored,
	}
	for name, p := range switches {
		short := map[string]string{"help": "h"}[name]
		fs.VarPF(switchValue{p}, name, short, "").NoOptDefVal = present
	}
	values := map[string]*string{
		"tpm-state": &o.StateDir, "tpmstate": &o.StateDir, "vmid": &o.VMID, "keyfile": &o.KeyFile,
		"keyfile-fd": &o.KeyFileFD, "pwdfile": &o.PwdFile, "pwdfile-fd": &o.PwdFileFD, "cipher": &o.Cipher,
		"runas": &o.RunAs, "logfile": &o.Logfile, "pcr-banks": &o.PCRBanks, "rsa-keysize": &o.RSAKeySize,
		"write-ek-cert-files": &o.WriteEKCertFiles,
		"ecc-curve":           &o.ECCCurve, // vtpm: the ECC EK's curve
	}
	for name, p := range values {
		fs.StringVar(p, name, *p, "")
	}
	for _, name := range []string{"tpm", "swtpm_ioctl", "ownerpass", "srkpass", "config", "tcsd-system-ps-file"} {
		fs.String(name, "", "")
	}
	// An optional argument: taken only when attached (--create-config-files=x).
	fs.StringVar(&configFiles, "create-config-files", "", "")
	fs.Lookup("create-config-files").NoOptDefVal = present
	opts, err := setupOptionArgs(fs, args)
	if err != nil {
		return nil, err
	}
	if err := fs.Parse(opts); err != nil {
		return nil, usagef("%v", err) // setupOptionArgs has refused what pflag would
	}
	o.CreateEK = createEK || takeOwnership || o.EKCert || o.PlatformCert
	o.PCRBanksSet = fs.Changed("pcr-banks")
	o.CreateConfigFiles = fs.Changed("create-config-files")
	return o, nil
}

// setupOptionArgs returns the options in args with their values, leaving out
// the non-options that getopt_long would leave for swtpm_setup to ignore, and
// refuses what getopt_long refuses, with its messages.
func setupOptionArgs(fs *pflag.FlagSet, args []string) ([]string, error) {
	var out []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "-h" {
			out = append(out, a)
			continue
		}
		if !strings.HasPrefix(a, "--") || a == "--" {
			continue
		}
		name, _, hasVal := strings.Cut(a[2:], "=")
		f := fs.Lookup(name)
		if f == nil || name == "" {
			return nil, usagef("unrecognized option '%s'", a)
		}
		takesVal := f.NoOptDefVal == ""
		switch {
		case !takesVal && hasVal && name != "create-config-files":
			return nil, usagef("option '--%s' doesn't allow an argument", name)
		case takesVal && !hasVal && i+1 >= len(args):
			return nil, usagef("option '--%s' requires an argument", name)
		case takesVal && !hasVal:
			i++
			a += "=" + args[i]
		}
		out = append(out, a)
	}
	return out, nil
}

// KeyOption turns --keyfile/--pwdfile(-fd) and --cipher into swtpm's --key
// value, which selects swtpm's encrypted state format; "" when none is given.
func (o *SetupOptions) KeyOption() (string, error) {
	var opts []string
	for _, k := range []struct{ v, key string }{
		{o.KeyFile, "file="}, {o.KeyFileFD, "fd="}, {o.PwdFile, "pwdfile="}, {o.PwdFileFD, "pwdfd="},
	} {
		if k.v != "" {
			opts = append(opts, k.key+k.v)
		}
	}
	switch len(opts) {
	case 0:
		return "", nil
	case 1:
		return opts[0] + ",mode=" + o.Cipher, nil
	}
	return "", errors.New("Only one of --keyfile, --keyfile-fd, --pwdfile and --pwdfile-fd may be given.")
}
