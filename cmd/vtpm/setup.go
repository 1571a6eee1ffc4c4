package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vtpm/internal/manufacture"
	"vtpm/internal/state"
	"vtpm/internal/swtpm"
)

// setupConfig is a parsed swtpm_setup 0.7.1 command line.
type setupConfig struct {
	stateDir, vmid, logfile, runas                          string
	tpm2, createEK, ekCert, platformCert, lockNV, createSPK bool
	ecc, overwrite, notOverwrite, reconfigure               bool
	allowSigning, decryption                                bool
	pcrBanks                                                string
	pcrBanksSet                                             bool
	rsaKeysize                                              string
	keyfile, keyfileFD, pwdfile, pwdfileFD, cipher          string
	writeEKCertFiles                                        string
	printCaps, version, help, createConfigFiles             bool
	eccCurve                                                string // vtpm extension: p256 (default) or p384
}

// setupFlags are swtpm_setup 0.7.1's options: true when the option takes a value.
var setupFlags = map[string]bool{
	"tpm-state": true, "tpmstate": true, "tpm": true, "swtpm_ioctl": true, "tpm2": false, "ecc": false,
	"createek": false, "create-spk": false, "take-ownership": false, "ownerpass": true,
	"owner-well-known": false, "srkpass": true, "srk-well-known": false, "create-ek-cert": false,
	"create-platform-cert": false, "lock-nvram": false, "display": false, "config": true, "vmid": true,
	"keyfile": true, "keyfile-fd": true, "pwdfile": true, "pwdfile-fd": true, "cipher": true,
	"runas": true, "logfile": true, "overwrite": false, "not-overwrite": false, "allow-signing": false,
	"decryption": false, "pcr-banks": true, "rsa-keysize": true, "write-ek-cert-files": true,
	"create-config-files": false, "tcsd-system-ps-file": true, "version": false,
	"print-capabilities": false, "reconfigure": false, "help": false,
	"ecc-curve": true, // vtpm: the ECC EK's curve
}

// usageError is a command-line error: swtpm_setup prints it and its usage, exit 1.
type usageError string

func (e usageError) Error() string { return string(e) }

func parseSetup(args []string) (*setupConfig, error) {
	c := &setupConfig{cipher: "aes-128-cbc", rsaKeysize: "2048", eccCurve: "p256"}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "-h" {
			c.help = true
			continue
		}
		if !strings.HasPrefix(a, "--") || a == "--" {
			continue // getopt_long leaves non-options alone; swtpm_setup ignores them
		}
		name, val, hasVal := strings.Cut(a[2:], "=")
		takesVal, known := setupFlags[name]
		if !known {
			return nil, usageError(fmt.Sprintf("unrecognized option '%s'", a))
		}
		if name == "create-config-files" { // optional argument
			c.createConfigFiles = true
			if !hasVal && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				i++
			}
			continue
		}
		if takesVal && !hasVal {
			if i+1 >= len(args) {
				return nil, usageError(fmt.Sprintf("option '--%s' requires an argument", name))
			}
			i++
			val = args[i]
		} else if !takesVal && hasVal {
			return nil, usageError(fmt.Sprintf("option '--%s' doesn't allow an argument", name))
		}
		switch name {
		case "tpm-state", "tpmstate":
			c.stateDir = val
		case "tpm2":
			c.tpm2 = true
		case "ecc":
			c.ecc = true
		case "createek":
			c.createEK = true
		case "create-spk":
			c.createSPK = true
		case "take-ownership":
			c.createEK = true
		case "create-ek-cert":
			c.createEK, c.ekCert = true, true
		case "create-platform-cert":
			c.createEK, c.platformCert = true, true
		case "lock-nvram":
			c.lockNV = true
		case "vmid":
			c.vmid = val
		case "keyfile":
			c.keyfile = val
		case "keyfile-fd":
			c.keyfileFD = val
		case "pwdfile":
			c.pwdfile = val
		case "pwdfile-fd":
			c.pwdfileFD = val
		case "cipher":
			c.cipher = val
		case "runas":
			c.runas = val
		case "logfile":
			c.logfile = val
		case "overwrite":
			c.overwrite = true
		case "not-overwrite":
			c.notOverwrite = true
		case "allow-signing":
			c.allowSigning = true
		case "decryption":
			c.decryption = true
		case "pcr-banks":
			c.pcrBanks, c.pcrBanksSet = val, true
		case "rsa-keysize":
			c.rsaKeysize = val
		case "write-ek-cert-files":
			c.writeEKCertFiles = val
		case "version":
			c.version = true
		case "print-capabilities":
			c.printCaps = true
		case "reconfigure":
			c.reconfigure = true
		case "help":
			c.help = true
		case "ecc-curve":
			c.eccCurve = val
		}
		// --tpm, --swtpm_ioctl, --config, --display, --tcsd-system-ps-file, the
		// TPM 1.2 passwords: accepted; vtpm needs no external TPM or config.
	}
	return c, nil
}

// setupCapabilities is swtpm_setup's --print-capabilities, for what vtpm does:
// TPM 2.0 only, RSA-2048 EKs.
const setupCapabilities = `{ "type": "swtpm_setup", "features": [ "tpm-2.0", "cmdarg-keyfile-fd", "cmdarg-pwdfile-fd", "cmdarg-write-ek-cert-files", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks", "tpm2-rsa-keysize-2048" ], "version": "` + swtpm.Version + `" }`

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

// setupLog writes swtpm_setup's log lines: to the log file when given, else
// messages to stdout and errors to stderr.
type setupLog struct {
	out, err io.Writer
}

func (l *setupLog) info(format string, a ...any)  { fmt.Fprintf(l.out, format+"\n", a...) }
func (l *setupLog) error(format string, a ...any) { fmt.Fprintf(l.err, format+"\n", a...) }

// runSwtpmSetup is `swtpm_setup …`; it returns the exit code.
func runSwtpmSetup(args []string, stdout, stderr io.Writer) int {
	c, err := parseSetup(args)
	if err != nil {
		fmt.Fprintf(stderr, "swtpm_setup: %v\n", err)
		fmt.Fprint(stdout, setupUsage)
		return 1
	}
	switch {
	case c.help:
		fmt.Fprint(stdout, setupUsage)
		return 0
	case c.version:
		fmt.Fprintf(stdout, "TPM emulator setup tool version %s, vtpm %s\n", swtpm.Version, version)
		return 0
	case c.printCaps:
		fmt.Fprintln(stdout, setupCapabilities)
		return 0
	case c.createConfigFiles:
		return 0
	}
	log := &setupLog{out: stdout, err: stderr}
	if c.logfile != "" && c.logfile != "-" {
		f, err := os.OpenFile(c.logfile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			fmt.Fprintf(stderr, "Could not open logfile %s: %v\n", c.logfile, err)
			return 1
		}
		defer f.Close()
		log = &setupLog{out: f, err: f}
	}
	if c.stateDir == "" {
		log.error("--tpm-state must be provided")
		return 1
	}
	if !c.tpm2 {
		log.error("vtpm sets up TPM 2.0 only: pass --tpm2")
		return 1
	}
	if c.reconfigure && (c.createEK || c.ekCert || c.platformCert || c.createSPK || c.lockNV) {
		log.error("Reconfiguration is not supported with creation of EK or certificates")
		return 1
	}
	if c.rsaKeysize != "2048" && c.rsaKeysize != "max" {
		log.error("Unsupported RSA key size %s.", c.rsaKeysize)
		return 1
	}
	if c.cipher != "aes-128-cbc" && c.cipher != "aes-256-cbc" {
		log.error("Unsupported cipher %s.", c.cipher)
		return 1
	}
	curve, err := manufacture.ParseCurve(c.eccCurve)
	if err != nil || curve == manufacture.NoECC {
		log.error("Unsupported ECC curve %s: want p256 or p384.", c.eccCurve)
		return 1
	}
	dir := c.stateDir
	if strings.HasPrefix(dir, "file://") {
		log.error("The file:// backend (%s) is not supported by vtpm; use a directory.", dir)
		return 1
	}
	dir = strings.TrimPrefix(dir, "dir://")
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		log.error("User %s cannot access directory %s. Make sure it exists and is a directory.", currentUser(), dir)
		return 1
	}
	keyOpt, err := c.keyOption()
	if err != nil {
		log.error("%v", err)
		return 1
	}
	var owner *user.User
	if c.runas != "" {
		if owner, err = lookupUser(c.runas); err != nil {
			log.error("%v", err)
			return 1
		}
	}

	exists := state.HasState(dir)
	switch {
	case c.reconfigure && !exists:
		log.error("Cannot reconfigure: no TPM state in %s.", dir)
		return 1
	case c.reconfigure:
	case exists && c.notOverwrite:
		log.info("Not overwriting existing state file.")
		return 0
	case exists && !c.overwrite:
		log.error("Found existing TPM state 'permall'.")
		return 1
	}

	log.info("Starting vTPM manufacturing as %s @ %s", currentUser(), time.Now().Format(time.UnixDate))
	defer func() { log.info("Ending vTPM manufacturing @ %s", time.Now().Format(time.UnixDate)) }()
	if exists && !c.reconfigure {
		if err := state.Remove(dir); err != nil {
			log.error("%v", err)
			return 1
		}
	}
	o := manufacture.Options{
		EKCerts: c.ekCert, PlatformCert: c.platformCert, Lock: c.lockNV,
		Identity: manufacture.Identity{VM: c.vmid},
	}
	if c.createEK {
		o.RSA, o.ECC = true, curve
	}
	if c.createSPK {
		o.SPK = "rsa"
		if c.ecc {
			o.SPK = "ecc"
		}
	}
	banks := "sha256"
	if c.pcrBanksSet {
		banks = c.pcrBanks
	}
	if banks != "-" {
		for _, b := range strings.Split(banks, ",") {
			if b = strings.TrimSpace(b); manufacture.KnownBank(b) {
				o.PCRBanks = append(o.PCRBanks, b)
			}
		}
		if len(o.PCRBanks) == 0 {
			log.error("No PCR banks could be allocated. None of the selected algorithms are supported.")
			return c.fail(log, dir, exists)
		}
	}
	res, err := runManufacture(mfgRequest{dir: dir, swtpmKey: keyOpt, opts: o, log: warnLogger()})
	if err != nil {
		log.error("%v", err)
		return c.fail(log, dir, exists)
	}
	rep := res.report
	for _, ek := range rep.EKs {
		kind := "ECC"
		if strings.HasPrefix(ek.Name, "RSA") {
			kind = ek.Name
		}
		log.info("Successfully created %s EK with handle %#x.", kind, uint32(ek.Handle))
		if ek.Cert != nil {
			log.info("Successfully created NVRAM area %#x for %s EK certificate.", uint32(ek.CertIndex), kind)
		}
	}
	if rep.PlatformCert != nil {
		log.info("Successfully created NVRAM area %#x for platform certificate.", uint32(manufacture.IndexPlatform))
	}
	if o.PCRBanks != nil {
		log.info("Successfully activated PCR banks %s among %s.", strings.Join(rep.PCRBanks, ","), strings.Join(rep.Available, ","))
	}
	if c.writeEKCertFiles != "" {
		if err := writeCertFiles(c.writeEKCertFiles, rep); err != nil {
			log.error("%v", err)
			return c.fail(log, dir, exists)
		}
	}
	if owner != nil {
		if err := chownState(dir, owner); err != nil {
			log.error("%v", err)
			return c.fail(log, dir, exists)
		}
	}
	log.info("Successfully authored TPM state.")
	return 0
}

// fail ends a failed run as swtpm_setup does: the new state is deleted
// (reconfigured state is left alone), exit code 1.
func (c *setupConfig) fail(log *setupLog, dir string, existed bool) int {
	log.error("An error occurred. Authoring the TPM state failed.")
	if !c.reconfigure {
		state.Remove(dir)
	}
	return 1
}

// keyOption turns --keyfile/--pwdfile(-fd) and --cipher into swtpm's --key
// value, which selects swtpm's encrypted state format.
func (c *setupConfig) keyOption() (string, error) {
	var opts []string
	for _, o := range []struct{ v, key string }{
		{c.keyfile, "file="}, {c.keyfileFD, "fd="}, {c.pwdfile, "pwdfile="}, {c.pwdfileFD, "pwdfd="},
	} {
		if o.v != "" {
			opts = append(opts, o.key+o.v)
		}
	}
	switch len(opts) {
	case 0:
		return "", nil
	case 1:
		return opts[0] + ",mode=" + c.cipher, nil
	}
	return "", errors.New("Only one of --keyfile, --keyfile-fd, --pwdfile and --pwdfile-fd may be given.")
}

func writeCertFiles(dir string, rep *manufacture.Report) error {
	write := func(name string, der []byte) error {
		if der == nil {
			return nil
		}
		return os.WriteFile(filepath.Join(dir, name), der, 0o644)
	}
	for _, ek := range rep.EKs {
		name := map[string]string{"RSA 2048": "ek-rsa2048.crt", "ECC P-256": "ek-secp256r1.crt", "ECC P-384": "ek-secp384r1.crt"}[ek.Name]
		if err := write(name, ek.Cert); err != nil {
			return fmt.Errorf("--write-ek-cert-files: %w", err)
		}
	}
	if err := write("platform.crt", rep.PlatformCert); err != nil {
		return fmt.Errorf("--write-ek-cert-files: %w", err)
	}
	return nil
}

func currentUser() string {
	u, err := user.Current()
	if err != nil {
		return strconv.Itoa(os.Getuid())
	}
	g, err := user.LookupGroupId(u.Gid)
	if err != nil {
		return u.Username
	}
	return u.Username + ":" + g.Name
}

func lookupUser(name string) (*user.User, error) {
	u, err := user.Lookup(name)
	if err != nil {
		if u, err = user.LookupId(name); err != nil {
			return nil, fmt.Errorf("--runas %s: no such user", name)
		}
	}
	return u, nil
}

// chownState gives the state directory and its files to u (--runas), so the
// TPM process running as u can use them.
func chownState(dir string, u *user.User) error {
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	paths := []string{dir}
	for _, e := range entries {
		paths = append(paths, filepath.Join(dir, e.Name()))
	}
	for _, p := range paths {
		if err := os.Lchown(p, uid, gid); err != nil {
			return fmt.Errorf("--runas %s: %w (run as root to hand the state to another user)", u.Username, err)
		}
	}
	return nil
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
