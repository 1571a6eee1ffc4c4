package hostcheck

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
)

// KeystoreCheck reports how the keystore under root protects its master
// key; it never creates a keystore.
func KeystoreCheck(root, hostTPM string) Check {
	const name = "keystore"
	if _, err := os.Stat(filepath.Join(root, "keystore")); errors.Is(err, fs.ErrNotExist) {
		return warn(name, fmt.Sprintf("no keystore in %s yet; it is created by the first vTPM, sealed to /dev/tpmrm0 if it opens, else in a file", root),
			advise("on a host with a TPM, check that /dev/tpmrm0 opens for this user before starting the first vTPM"))
	}
	b, err := keybroker.Open(root, keystore.Options{HostTPM: hostTPM, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return missing(name, err.Error(), advise("see the error above; VTPM_HOST_TPM selects the host TPM"))
	}
	defer b.Close()
	p := b.Keystore().Protection()
	if p.Kind == "tpm" {
		return ok(name, "master key sealed to the host TPM: "+p.Detail)
	}
	// No command re-seals a keystore in place: its guardians move to a new
	// one through their exports.
	ks := filepath.Join(root, "keystore")
	return warn(name, "master key in a file ("+p.Detail+"): anyone who copies the data root has the keys",
		errdefs.Do(errdefs.ActionGuardianExport, "file", "guardian.p12").WithNote("on a host with a TPM, export each guardian this host holds (guardian list names them)"),
		advise("then move %s aside: the next vtpm command creates a keystore sealed to the host TPM (VTPM_HOST_TPM=device:/dev/tpmrm0 selects it)", ks),
		errdefs.Do(errdefs.ActionGuardianImport, "file", "guardian.p12").WithNote("and import each export into it (TPM keys brought in with key import need their key files imported again)"))
}

// DataRootCheck reports whether the data root is this user's and private.
func DataRootCheck(root string) Check {
	const name = "data root"
	st, err := os.Stat(root)
	if errors.Is(err, fs.ErrNotExist) {
		return warn(name, root+" does not exist yet; the first vTPM creates it with mode 0700")
	}
	if err != nil {
		return missing(name, err.Error(), errdefs.Do(errdefs.ActionDoctor).WithNote("run it as the user that runs the vTPMs"))
	}
	uid := int(st.Sys().(*syscall.Stat_t).Uid)
	switch {
	case uid != os.Geteuid():
		return missing(name, fmt.Sprintf("%s is owned by uid %d, not by this user (uid %d)", root, uid, os.Geteuid()),
			advise("chown -R %d %s, or run vtpm as its owner", os.Geteuid(), root))
	case st.Mode().Perm()&0o077 != 0:
		return missing(name, fmt.Sprintf("%s has mode %04o: other users can reach the keys", root, st.Mode().Perm()),
			advise("chmod 700 %s", root))
	}
	return ok(name, fmt.Sprintf("%s mode %04o, owned by this user", root, st.Mode().Perm()))
}

// RollbackCheck lists the TPMs whose rollback protection started over on
// this host: they had state but no generation record when they started
// (keybroker.RollbackResets). It never creates a keystore.
func RollbackCheck(root, hostTPM string) Check {
	const name = "rollback records"
	if _, err := os.Stat(filepath.Join(root, "keystore")); errors.Is(err, fs.ErrNotExist) {
		return ok(name, "no TPM has started on this host yet")
	}
	b, err := keybroker.Open(root, keystore.Options{HostTPM: hostTPM, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return missing(name, err.Error(), advise("see the keystore check"))
	}
	defer b.Close()
	resets, err := b.RollbackResets()
	if err != nil {
		return missing(name, err.Error(), advise("restore the keystore from a backup"))
	}
	if len(resets) == 0 {
		return ok(name, "every TPM started here kept its generation record")
	}
	var list []string
	for _, r := range resets {
		list = append(list, fmt.Sprintf("TPM %s in %s (%s)", r.TPM, r.Dir, r.Time.Format("2006-01-02 15:04:05Z")))
	}
	return warn(name, "rollback protection was reset for these TPMs (their generation record was missing, or they came from another host): "+strings.Join(list, "; "),
		advise("make sure each of these TPMs runs on its current state (restore it from a backup if not); from then on rollbacks are detected again"))
}
