package seal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

// Why a damaged copy is not a write torn by a crash.
const (
	// ReasonCleanStop: the generation record says a newer copy than any
	// that verifies was written completely; a crash in the middle of a
	// write never gets that far, so the newest copy was damaged afterwards.
	ReasonCleanStop = "damaged after it was written completely"
	// ReasonForeign: the damaged copy's header names another TPM; no write
	// of this TPM leaves that behind.
	ReasonForeign = "names another TPM"
)

// DamageError refuses to load a blob whose newest copy does not verify for
// a reason a crash cannot explain. Nothing was loaded or changed: the
// damaged file is evidence, and loading the copy beside it would roll the
// TPM back.
type DamageError struct {
	TPM      uuid.UUID
	Blob     string
	File     string    // the damaged copy (base name)
	Damage   error     // why it does not verify
	Reasons  []string  // ReasonCleanStop, ReasonForeign
	Names    uuid.UUID // the TPM the damaged copy's header names, if ReasonForeign
	Loadable uint64    // newest generation that verifies, 0 if none
	Recorded uint64    // last generation recorded for the TPM
}

func (e *DamageError) Error() string {
	var why []string
	for _, r := range e.Reasons {
		switch r {
		case ReasonCleanStop:
			why = append(why, fmt.Sprintf("generation %d was recorded as written completely, but the newest copy that verifies is generation %d, so this is no write torn by a crash (it would roll the TPM back)", e.Recorded, e.Loadable))
		case ReasonForeign:
			why = append(why, fmt.Sprintf("its header names TPM %s, another TPM's state put in its place", e.Names))
		}
	}
	return fmt.Sprintf("%s of TPM %s does not verify (%v), and %s; the state was not loaded and nothing was changed",
		e.File, e.TPM, e.Damage, strings.Join(why, "; and "))
}

// Unwrap matches ErrRollback when loading the other copy would roll back,
// errdefs.ErrDataLoss, and the damage itself.
func (e *DamageError) Unwrap() []error {
	errs := []error{errdefs.ErrDataLoss, e.Damage}
	for _, r := range e.Reasons {
		if r == ReasonCleanStop {
			errs = append(errs, ErrRollback)
		}
	}
	return errs
}

// Remedies are restoring the state, or deliberately starting from the copy
// that verifies.
func (e *DamageError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Advise("restore the TPM's state directory from a backup"),
		errdefs.Advise("or start deliberately from the older copy with --allow-rollback; %s is then moved aside, not overwritten", e.File),
	}
}

// damageReasons says why damaged copy c is not a write torn by a crash
// (nil: it may be one). best is the newest copy that verifies (nil if
// none), last the recorded generation.
func (s *Store) damageReasons(c *sealedCopy, best *sealedCopy, last uint64) (reasons []string, names uuid.UUID) {
	if best != nil && best.gen < last {
		reasons = append(reasons, ReasonCleanStop)
	}
	// The header is not authenticated: it only says what the file claims.
	// Only a well-formed header counts: a torn write mixes this TPM's old
	// and new bytes, never another UUID, but its garbage may look like one.
	if head, err := readHead(c.path); err == nil && len(head) >= 36 && string(head[:len(Magic)]) == Magic &&
		binary.BigEndian.Uint16(head[8:]) == FormatVersion {
		if id := uuid.UUID(head[20:36]); id != s.id && id != uuid.Nil {
			reasons, names = append(reasons, ReasonForeign), id
		}
	}
	return reasons, names
}

// unusable returns the first copy this process may not read, or (a slot)
// may not write: it may well be the newest, and the TPM's next write may go
// into it, so the state is not loaded until the permissions are fixed
// (rather than failing the TPM's first write with a bare response code).
func (sc *scan) unusable() *sealedCopy {
	for i := range sc.copies {
		c := &sc.copies[i]
		if errors.Is(c.err, fs.ErrPermission) {
			return c
		}
		if c.slot < 0 || c.missing() {
			continue
		}
		// Opening for writing without O_TRUNC changes nothing.
		f, err := os.OpenFile(c.path, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
		if errors.Is(err, fs.ErrPermission) {
			c.err = fmt.Errorf("%s: %w", filepath.Base(c.path), err)
			return c
		}
		if err == nil {
			f.Close()
		}
	}
	return nil
}

// moveAside renames a damaged copy out of the way of the next write,
// keeping it as evidence, and returns its new path.
func (s *Store) moveAside(c *sealedCopy) (string, error) {
	dst := c.path + ".damaged-" + time.Now().UTC().Format("20060102T150405.000000000Z")
	if err := os.Rename(c.path, dst); err != nil {
		return "", fmt.Errorf("move the damaged %s aside: %w", filepath.Base(c.path), err)
	}
	if err := syncDir(s.dir); err != nil {
		return "", fmt.Errorf("move the damaged %s aside: %w", filepath.Base(c.path), err)
	}
	return dst, nil
}
