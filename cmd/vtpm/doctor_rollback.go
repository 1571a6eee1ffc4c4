package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/paths"
)

// rollbackCheck lists the TPMs whose rollback protection started over on
// this host: they had state but no generation record when they started.
func rollbackCheck() check {
	const name = "rollback records"
	root := paths.DataRoot()
	if _, err := os.Stat(filepath.Join(root, "keystore")); errors.Is(err, fs.ErrNotExist) {
		return check{Name: name, Status: statusOK, Detail: "no TPM has started on this host yet"}
	}
	host, err := keybroker.Open(root, keystore.Options{HostTPM: os.Getenv("VTPM_HOST_TPM"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return check{Name: name, Status: statusMissing, Detail: err.Error(), Fix: "see the keystore check"}
	}
	defer host.Close()
	resets, err := host.RollbackResets()
	if err != nil {
		return check{Name: name, Status: statusMissing, Detail: err.Error(), Fix: "restore the keystore from a backup"}
	}
	if len(resets) == 0 {
		return check{Name: name, Status: statusOK, Detail: "every TPM started here kept its generation record"}
	}
	var list []string
	for _, r := range resets {
		list = append(list, fmt.Sprintf("TPM %s in %s (%s)", r.TPM, r.Dir, r.Time.Format("2006-01-02 15:04:05Z")))
	}
	return check{Name: name, Status: statusWarning,
		Detail: "rollback protection was reset for these TPMs (their generation record was missing, or they came from another host): " + strings.Join(list, "; "),
		Fix:    "make sure each of these TPMs runs on its current state (restore it from a backup if not); from then on rollbacks are detected again"}
}
