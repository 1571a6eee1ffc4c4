package manufacture

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/state"
	"vtpm/internal/swtpm"
)

// SetupResult is how far a swtpm_setup run got, for its log.
type SetupResult struct {
	User string // who ran it, as user:group
	// Kept is set when existing state was kept (--not-overwrite) and
	// nothing else was done.
	Kept bool
	// Started and Ended bracket the manufacturing; Started is zero when
	// the request was refused before it began.
	Started, Ended time.Time
	// Report is what was made; nil when manufacturing did not succeed.
	Report *Report
	// Banks are the PCR banks asked for; nil keeps the TPM's.
	Banks []string
	// Failed is set when authoring failed after it began; the new state
	// is removed (reconfigured state is left alone).
	Failed bool
}

// Setup does what swtpm_setup does with o: it checks the request, keeps or
// replaces existing state as --not-overwrite and --overwrite say,
// manufactures the TPM in o.StateDir (or, with --reconfigure, changes its PCR
// banks), writes the certificate files and hands the state to --runas. The
// error's message is swtpm_setup's; the result is never nil.
func Setup(o *swtpm.SetupOptions, open OpenBroker, log *slog.Logger) (*SetupResult, error) {
	return SetupOn(o, FromBroker(open), log)
}

// SetupOn is Setup on the host open opens.
func SetupOn(o *swtpm.SetupOptions, open OpenHost, log *slog.Logger) (*SetupResult, error) {
	res := &SetupResult{User: currentUser()}
	dir, key, owner, err := checkSetup(o, res.User)
	if err != nil {
		return res, err
	}
	exists := state.HasState(dir)
	switch {
	case o.Reconfigure && !exists:
		return res, errdefs.New(errdefs.ErrNotFound, "Cannot reconfigure: no TPM state in %s.", dir)
	case o.Reconfigure:
	case exists && o.NotOverwrite:
		res.Kept = true
		return res, nil
	case exists && !o.Overwrite:
		return res, errdefs.New(errdefs.ErrAlreadyExists, "Found existing TPM state 'permall'.")
	}

	res.Started = time.Now()
	defer func() { res.Ended = time.Now() }()
	if exists && !o.Reconfigure {
		if err := state.Remove(dir); err != nil {
			return res, err
		}
	}
	fail := func(err error) (*SetupResult, error) {
		res.Failed = true
		if !o.Reconfigure {
			state.Remove(dir)
		}
		return res, err
	}
	opts := setupOptions(o)
	res.Banks = opts.PCRBanks
	if opts.PCRBanks != nil && len(opts.PCRBanks) == 0 {
		return fail(errdefs.New(errdefs.ErrInvalidArgument, "No PCR banks could be allocated. None of the selected algorithms are supported."))
	}
	made, err := RunOn(open, Request{Dir: dir, SwtpmKey: key, Options: opts, Log: log})
	if err != nil {
		return fail(err)
	}
	res.Report = made.Report
	if o.WriteEKCertFiles != "" {
		if err := writeCertFiles(o.WriteEKCertFiles, made.Report); err != nil {
			return fail(err)
		}
	}
	if owner != nil {
		if err := chownState(dir, owner); err != nil {
			return fail(err)
		}
	}
	return res, nil
}

// checkSetup refuses what swtpm_setup cannot do, with its messages, and
// returns the state directory, the swtpm --key option and the --runas user.
func checkSetup(o *swtpm.SetupOptions, me string) (dir, key string, owner *user.User, err error) {
	bad := func(format string, a ...any) (string, string, *user.User, error) {
		return "", "", nil, errdefs.New(errdefs.ErrInvalidArgument, format, a...)
	}
	switch {
	case o.StateDir == "":
		return bad("--tpm-state must be provided")
	case !o.TPM2:
		return bad("vtpm sets up TPM 2.0 only: pass --tpm2")
	case o.Reconfigure && (o.CreateEK || o.EKCert || o.PlatformCert || o.CreateSPK || o.LockNV):
		return bad("Reconfiguration is not supported with creation of EK or certificates")
	case o.RSAKeySize != "2048" && o.RSAKeySize != "max":
		return bad("Unsupported RSA key size %s.", o.RSAKeySize)
	case o.Cipher != "aes-128-cbc" && o.Cipher != "aes-256-cbc":
		return bad("Unsupported cipher %s.", o.Cipher)
	}
	if c, err := ParseCurve(o.ECCCurve); err != nil || c == NoECC {
		return bad("Unsupported ECC curve %s: want p256 or p384.", o.ECCCurve)
	}
	if strings.HasPrefix(o.StateDir, "file://") {
		return bad("The file:// backend (%s) is not supported by vtpm; use a directory.", o.StateDir)
	}
	dir = strings.TrimPrefix(o.StateDir, "dir://")
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return "", "", nil, errdefs.New(errdefs.ErrNotFound, "User %s cannot access directory %s. Make sure it exists and is a directory.", me, dir)
	}
	if key, err = o.KeyOption(); err != nil {
		return bad("%v", err)
	}
	if o.RunAs != "" {
		if owner, err = lookupUser(o.RunAs); err != nil {
			return "", "", nil, err
		}
	}
	return dir, key, owner, nil
}

// setupOptions are the manufacture options o asks for.
func setupOptions(o *swtpm.SetupOptions) Options {
	opts := Options{
		EKCerts: o.EKCert, PlatformCert: o.PlatformCert, Lock: o.LockNV,
		Identity: Identity{VM: o.VMID},
	}
	if o.CreateEK {
		opts.RSA = true
		opts.ECC, _ = ParseCurve(o.ECCCurve)
	}
	if o.CreateSPK {
		opts.SPK = "rsa"
		if o.ECC {
			opts.SPK = "ecc"
		}
	}
	banks := "sha256"
	if o.PCRBanksSet {
		banks = o.PCRBanks
	}
	if banks != "-" {
		opts.PCRBanks = []string{}
		for _, b := range strings.Split(banks, ",") {
			if b = strings.TrimSpace(b); KnownBank(b) {
				opts.PCRBanks = append(opts.PCRBanks, b)
			}
		}
	}
	return opts
}

// writeCertFiles writes the EK and platform certificates into dir in DER,
// under swtpm_setup's file names.
func writeCertFiles(dir string, rep *Report) error {
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

// currentUser is user:group of this process, as swtpm_setup logs it.
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
			return nil, errdefs.New(errdefs.ErrNotFound, "--runas %s: no such user", name)
		}
	}
	return u, nil
}

// chownState gives the state directory and its files to u (--runas), so the
// TPM process running as u can use them.
func chownState(dir string, u *user.User) error {
	// Ids that do not parse fail closed: never hand the state to uid 0 by accident.
	uid, uerr := strconv.Atoi(u.Uid)
	gid, gerr := strconv.Atoi(u.Gid)
	if uerr != nil || gerr != nil || uid < 0 || gid < 0 {
		return errdefs.New(errdefs.ErrInvalidArgument, "--runas %s: uid %q or gid %q is not a number; the state was not handed over", u.Username, u.Uid, u.Gid)
	}
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

// WriteLog writes r as swtpm_setup logs a run: messages to w, and err (what
// Setup returned) to errw. libvirt shows this log when a TPM cannot be set
// up, so its lines are swtpm_setup's.
func (r *SetupResult) WriteLog(w, errw io.Writer, err error) {
	info := func(format string, a ...any) { fmt.Fprintf(w, format+"\n", a...) }
	switch {
	case r.Kept:
		info("Not overwriting existing state file.")
		return
	case r.Started.IsZero():
		fmt.Fprintf(errw, "%v\n", err)
		return
	}
	info("Starting vTPM manufacturing as %s @ %s", r.User, r.Started.Format(time.UnixDate))
	if rep := r.Report; rep != nil {
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
			info("Successfully created NVRAM area %#x for platform certificate.", uint32(IndexPlatform))
		}
		if r.Banks != nil {
			info("Successfully activated PCR banks %s among %s.", strings.Join(rep.PCRBanks, ","), strings.Join(rep.Available, ","))
		}
	}
	if err != nil {
		fmt.Fprintf(errw, "%v\n", err)
		if r.Failed {
			fmt.Fprintln(errw, "An error occurred. Authoring the TPM state failed.")
		}
	} else {
		info("Successfully authored TPM state.")
	}
	info("Ending vTPM manufacturing @ %s", r.Ended.Format(time.UnixDate))
}
