// Package keybroker opens a TPM's data key on this host: it keeps the host's
// guardians in the keystore, reads and writes key protectors beside sealed
// state, and applies a TPM's policy when its key is gone.
package keybroker

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keystore"
	"vtpm/internal/seal"
	"vtpm/internal/state"
)

// Files beside the sealed state.
const (
	ProtectorFile = state.ProtectorFile
	PolicyFile    = state.PolicyFile
)

// Keystore record kinds.
const (
	kindGuardian = "guardian" // name: fingerprint; data: guardian.Marshal with private key
	kindHost     = "host"     // name "local": fingerprint of this host's own guardian
	kindTPMKey   = "tpm-key"  // name: TPM UUID; data: an imported DEK
)

// ErrConflict reports an import of something this host already holds.
var ErrConflict error = errdefs.New(errdefs.ErrAlreadyExists, "already present")

// Broker is this host's key material: its keystore and the guardians in it.
type Broker struct {
	ks  *keystore.Keystore
	log *slog.Logger
}

// Open opens the host keystore under dataRoot, creating it on first use.
func Open(dataRoot string, opts keystore.Options) (*Broker, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	ks, err := keystore.Open(filepath.Join(dataRoot, "keystore"), opts)
	if err != nil {
		return nil, err
	}
	return &Broker{ks: ks, log: opts.Logger}, nil
}

// Close closes the keystore.
func (h *Broker) Close() error { return h.ks.Close() }

// Keystore returns the underlying keystore.
func (h *Broker) Keystore() *keystore.Keystore { return h.ks }

// Generations is where this host remembers the newest state generation of
// every TPM it has opened (rollback protection).
func (h *Broker) Generations() seal.Generations { return h.ks.Generations() }

// Local returns this host's own guardian, creating it on first use.
func (h *Broker) Local() (*guardian.Guardian, error) {
	fp, err := h.ks.Get(kindHost, "local")
	if err == nil {
		return h.guardian(string(fp))
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	name, _ := os.Hostname()
	if name == "" {
		name = "localhost"
	}
	g, err := guardian.New("host:"+name, guardian.MLKEM768X25519)
	if err != nil {
		return nil, fmt.Errorf("create this host's guardian: %w", err)
	}
	if err := h.put(g); err != nil {
		return nil, err
	}
	if err := h.ks.Put(kindHost, "local", []byte(g.Fingerprint())); err != nil {
		return nil, err
	}
	h.log.Info("created this host's guardian", "name", g.Name(), "fingerprint", g.Fingerprint())
	return g, nil
}

func (h *Broker) put(g *guardian.Guardian) error {
	b, err := g.Marshal()
	if err != nil {
		return fmt.Errorf("store guardian %s: %w", g.Name(), err)
	}
	return h.ks.Put(kindGuardian, g.Fingerprint(), b)
}

func (h *Broker) guardian(fp string) (*guardian.Guardian, error) {
	b, err := h.ks.Get(kindGuardian, fp)
	if err != nil {
		return nil, err
	}
	g, err := guardian.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("guardian %s in the keystore is damaged: %w", fp, err)
	}
	return g, nil
}

// Guardians returns every guardian this host holds, its own first.
func (h *Broker) Guardians() ([]*guardian.Guardian, error) {
	local, err := h.Local()
	if err != nil {
		return nil, err
	}
	fps, err := h.ks.List(kindGuardian)
	if err != nil {
		return nil, err
	}
	gs := []*guardian.Guardian{local}
	for _, fp := range fps {
		if fp == local.Fingerprint() {
			continue
		}
		g, err := h.guardian(fp)
		if err != nil {
			return nil, err
		}
		gs = append(gs, g)
	}
	return gs, nil
}

// Find returns the held guardian whose name or fingerprint (or a prefix of
// at least 8 hex digits of it) is ref.
func (h *Broker) Find(ref string) (*guardian.Guardian, error) {
	gs, err := h.Guardians()
	if err != nil {
		return nil, err
	}
	var found []*guardian.Guardian
	for _, g := range gs {
		if g.Name() == ref || g.Fingerprint() == ref || (len(ref) >= 8 && strings.HasPrefix(g.Fingerprint(), ref)) {
			found = append(found, g)
		}
	}
	switch len(found) {
	case 0:
		return nil, errdefs.New(errdefs.ErrNotFound, "no guardian %q on this host", ref).
			With(errdefs.Do(errdefs.ActionGuardianList).WithNote("see the ones it holds"))
	case 1:
		return found[0], nil
	}
	return nil, errdefs.New(errdefs.ErrInvalidArgument, "%q names %d guardians; give a fingerprint instead", ref, len(found))
}

// Import adds a guardian (with its private key) to this host. A guardian
// already present is a conflict unless replace is set.
func (h *Broker) Import(g *guardian.Guardian, replace bool) error {
	if !g.HasPrivate() {
		return errdefs.New(errdefs.ErrInvalidArgument, "guardian %s has no private key: a host can only hold guardians it can open protectors with", g.Name()).
			With(errdefs.Do(errdefs.ActionProtectorGrant).WithNote("grant a certificate-only guardian instead"))
	}
	if _, err := h.ks.Get(kindGuardian, g.Fingerprint()); err == nil && !replace {
		return fmt.Errorf("guardian %s (%s) is %w on this host; pass --replace to overwrite it", g.Name(), g.Fingerprint(), ErrConflict)
	}
	return h.put(g)
}

// Remove deletes a guardian from this host. The host's own guardian cannot be removed.
func (h *Broker) Remove(ref string) (*guardian.Guardian, error) {
	g, err := h.Find(ref)
	if err != nil {
		return nil, err
	}
	local, err := h.Local()
	if err != nil {
		return nil, err
	}
	if g.Fingerprint() == local.Fingerprint() {
		return nil, errdefs.New(errdefs.ErrFailedPrecondition, "guardian %s is this host's own guardian and cannot be removed", g.Name())
	}
	return g, h.ks.Delete(kindGuardian, g.Fingerprint())
}

// importKey stores a TPM's data key, exported from another host, so that
// this host can open that TPM. A different key already held for the same TPM
// is a conflict unless replace is set.
func (h *Broker) importKey(id uuid.UUID, dek []byte, replace bool) error {
	if old, err := h.ks.Get(kindTPMKey, id.String()); err == nil && !replace {
		same := string(old) == string(dek)
		clear(old)
		if same {
			return nil
		}
		return fmt.Errorf("a different key for TPM %s is %w on this host; pass --replace to overwrite it", id, ErrConflict)
	}
	return h.ks.Put(kindTPMKey, id.String(), dek)
}

// Policy is a TPM's key policy, stored beside its state.
type Policy struct {
	// OnMissingKey is "fail" (default) or "reprovision".
	OnMissingKey string `json:"on_missing_key"`
}

// ReadPolicy reads dir's policy; a missing file is the default policy.
func ReadPolicy(dir string) (Policy, error) {
	p := Policy{OnMissingKey: "fail"}
	b, err := os.ReadFile(filepath.Join(dir, PolicyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return p, nil
	}
	if err != nil {
		return p, err
	}
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("%s is damaged: %w", filepath.Join(dir, PolicyFile), err)
	}
	return p, p.validate()
}

func (p Policy) validate() error {
	switch p.OnMissingKey {
	case "fail", "reprovision":
		return nil
	}
	return errdefs.New(errdefs.ErrInvalidArgument, "on-missing-key %q: want fail or reprovision", p.OnMissingKey)
}

// WritePolicy stores dir's policy.
func WritePolicy(dir string, p Policy) error {
	if err := p.validate(); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(p, "", "  ")
	return atomicfile.Write(filepath.Join(dir, PolicyFile), append(b, '\n'), 0o600)
}

// UpdatePolicy returns dir's policy, first setting its on-missing-key to
// *onMissingKey when that is not nil.
func UpdatePolicy(dir string, onMissingKey *string) (Policy, error) {
	p, err := ReadPolicy(dir)
	if err != nil || onMissingKey == nil {
		return p, err
	}
	p.OnMissingKey = *onMissingKey
	return p, WritePolicy(dir, p)
}

// Opened is the outcome of opening a TPM's key. Close wipes the key.
type Opened struct {
	TPM uuid.UUID
	Key *Key
	// By names what opened it: a guardian, or "imported key".
	By string
	// Created is set when the TPM is new and got its first protector.
	Created bool
	// Backup is where the old state went when the TPM was reprovisioned.
	Backup string
}

// Close wipes the key.
func (o *Opened) Close() {
	if o != nil {
		o.Key.Close()
	}
}

// OpenTPM opens the data key of the TPM whose state is in dir. A new
// directory gets a fresh key and a protector owned by this host's guardian.
// The caller closes the result.
func (h *Broker) OpenTPM(dir string) (*Opened, error) {
	return h.OpenTPMWith(dir, OpenOptions{})
}

// OpenTPMWith is OpenTPM with options. A protector that a guardian of this
// host opens is accepted only when this host holds or trusts its owner
// (see Trust); one older than the newest version seen here is refused
// unless opts.AllowRollback; and the key it holds must open the state.
func (h *Broker) OpenTPMWith(dir string, opts OpenOptions) (*Opened, error) {
	// Before anything is locked or created: a TPM that lost its state
	// fails with nothing written.
	if err := checkMissingState(dir); err != nil {
		return nil, err
	}
	o, err := h.openTPM(dir, false, opts)
	if !errors.Is(err, errNeedLock) {
		return o, err
	}
	// Creating the TPM's identity or key, or reprovisioning it, happens
	// under the directory's lock and on what is there once it is held, so
	// that processes starting the same TPM at once agree on one identity and
	// one key, and none seals state with a key its protector does not hold.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	l, err := state.Lock(dir)
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	return h.openTPM(dir, true, opts)
}

// OpenTPMHeld is OpenTPMWith for a directory whose lock another process
// holds for this call: the host service, opening the key of a vTPM that
// proved it holds its state directory's lock, creates or reprovisions the
// TPM under that lock.
func (h *Broker) OpenTPMHeld(dir string, opts OpenOptions) (*Opened, error) {
	if err := checkMissingState(dir); err != nil {
		return nil, err
	}
	return h.openTPM(dir, true, opts)
}

// A Broker is what opens sealed state (state.OpenSealed).
var _ state.Keys = (*Broker)(nil)

// OpenKey is OpenTPM for callers that need only the key and the TPM's
// UUID; it makes a Broker the state.Keys that opens sealed state.
func (h *Broker) OpenKey(dir string) (uuid.UUID, state.SealKey, error) {
	o, err := h.OpenTPM(dir)
	if err != nil {
		return uuid.Nil, nil, err
	}
	return o.TPM, o.Key, nil
}

// errNeedLock: openTPM must change dir, so it has to run under dir's lock.
var errNeedLock = errors.New("the state directory's lock is needed")

// openTPM is OpenTPM; locked says whether the caller holds dir's lock.
func (h *Broker) openTPM(dir string, locked bool, opts OpenOptions) (*Opened, error) {
	if !locked && !seal.Exists(dir) {
		return nil, errNeedLock // Identify would create vtpm-state.json
	}
	id, err := seal.Identify(dir)
	if err != nil {
		return nil, err
	}
	p, err := ReadProtector(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if dek, ok := h.importedKey(id); ok {
			return opened(id, dek, "imported key")
		}
		if seal.HasBlobs(dir) {
			return nil, errdefs.New(errdefs.ErrDataLoss, "TPM %s in %s has sealed state but no key protector (%s): restore %s from a backup, or import the TPM's key", id, dir, ProtectorFile, ProtectorFile).
				With(errdefs.Do(errdefs.ActionKeyImport))
		}
		if !locked {
			return nil, errNeedLock
		}
		return h.create(dir, id)
	}
	if err != nil {
		return nil, err
	}
	if p.TPM() != id {
		return nil, errdefs.New(errdefs.ErrDataLoss, "%s belongs to TPM %s, but %s holds TPM %s: the files were mixed up; restore the right %s", filepath.Join(dir, ProtectorFile), p.TPM(), dir, id, ProtectorFile)
	}
	gs, err := h.Guardians()
	if err != nil {
		return nil, err
	}
	dek, by, err := p.Open(gs)
	if err == nil {
		return h.opened(dir, p, dek, by.Name(), gs, opts)
	}
	var none *guardian.NoGuardianError
	if !errors.As(err, &none) {
		return nil, fmt.Errorf("open key protector of TPM %s: %w", id, err)
	}
	wrongImport := false
	if dek, ok := h.importedKey(id); ok {
		if p.Holds(dek) {
			return h.openedImported(dir, p, dek, opts)
		}
		// Imported from another copy of the TPM, or for a TPM since
		// reprovisioned elsewhere: it would not decrypt the state.
		clear(dek)
		wrongImport = true
	}
	pol, perr := ReadPolicy(dir)
	if perr != nil {
		return nil, perr
	}
	if pol.OnMissingKey == "reprovision" && (opts.Releasable == nil || !opts.Releasable(none.Rows)) {
		if !locked {
			return nil, errNeedLock
		}
		return h.reprovision(dir, id, none)
	}
	return nil, &MissingKeyError{Dir: dir, TPM: id, Rows: none.Rows, Held: gs, WrongImportedKey: wrongImport}
}

// opened moves dek into locked memory.
func opened(id uuid.UUID, dek []byte, by string) (*Opened, error) {
	k, err := newKey(id, dek)
	if err != nil {
		return nil, err
	}
	return &Opened{TPM: id, Key: k, By: by}, nil
}

func (h *Broker) importedKey(id uuid.UUID) ([]byte, bool) {
	dek, err := h.ks.Get(kindTPMKey, id.String())
	return dek, err == nil && len(dek) == 32
}

func (h *Broker) create(dir string, id uuid.UUID) (*Opened, error) {
	local, err := h.Local()
	if err != nil {
		return nil, err
	}
	k, err := randomKey(id)
	if err != nil {
		return nil, err
	}
	p, err := guardian.NewProtector(id, k.bytes(), local)
	if err == nil {
		err = WriteProtector(dir, p)
	}
	if err != nil {
		k.Close()
		return nil, err
	}
	h.log.Info("new TPM: created its data key and key protector", "tpm", id, "owner", local.Name())
	return &Opened{TPM: id, Key: k, By: local.Name(), Created: true}, nil
}

// backupPrefix starts the name of the directory reprovisioning moves a
// TPM's old state into.
const backupPrefix = "backup-"

// reprovision moves the unopenable state into a timestamped backup directory
// beside it and starts a fresh TPM. Nothing is deleted.
// The caller holds dir's lock.
func (h *Broker) reprovision(dir string, old uuid.UUID, why *guardian.NoGuardianError) (*Opened, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var move []string
	for _, e := range entries {
		n := e.Name()
		if n == state.LockFile || n == PolicyFile || strings.HasPrefix(n, backupPrefix) || e.Type()&fs.ModeSocket != 0 {
			continue
		}
		move = append(move, n)
	}
	backup, err := state.MoveAside(dir, backupPrefix+state.Stamp(time.Now()), move)
	if err != nil {
		return nil, fmt.Errorf("reprovision: %w", err)
	}
	id, err := seal.Identify(dir)
	if err != nil {
		return nil, err
	}
	o, err := h.create(dir, id)
	if err != nil {
		return nil, err
	}
	o.Backup = backup
	h.log.Warn("REPROVISIONED: the TPM's key is gone and its policy is on-missing-key=reprovision; "+
		"a fresh TPM replaces it (BitLocker and other sealed secrets will ask for recovery)",
		"old_tpm", old, "new_tpm", id, "backup", backup, "guardians_that_could_open_it", len(why.Rows))
	return o, nil
}

// ReadProtector reads and verifies dir's key protector.
func ReadProtector(dir string) (*guardian.Protector, error) {
	path := filepath.Join(dir, ProtectorFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	p, err := guardian.ParseProtector(b)
	if err != nil {
		return nil, fmt.Errorf("%s is rejected: %w (it was changed outside vtpm; restore it from a backup)", path, err)
	}
	return p, nil
}

// WriteProtector stores dir's key protector crash-safely.
func WriteProtector(dir string, p *guardian.Protector) error {
	return atomicfile.Write(filepath.Join(dir, ProtectorFile), p.Marshal(), 0o600)
}

// MissingKeyError says that no guardian on this host can open a TPM: which
// guardians could, which this host holds, and (Remedies) the ways out. It
// matches errdefs.ErrPermissionDenied: this host is not admitted.
type MissingKeyError struct {
	Dir  string
	TPM  uuid.UUID
	Rows []guardian.Row
	Held []*guardian.Guardian
	// WrongImportedKey is set when this host holds an imported key for the
	// TPM that does not open its protector.
	WrongImportedKey bool
}

func (e *MissingKeyError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "TPM %s (%s) cannot be opened on this host: no guardian here can unwrap its data key.\n", e.TPM, e.Dir)
	b.WriteString("Its key protector admits:\n")
	for _, r := range e.Rows {
		fmt.Fprintf(&b, "  - %s (fingerprint %s)\n", r.Name, r.Fingerprint)
	}
	b.WriteString("This host holds:\n")
	for _, g := range e.Held {
		fmt.Fprintf(&b, "  - %s (fingerprint %s)\n", g.Name(), g.Fingerprint())
	}
	if e.WrongImportedKey {
		b.WriteString("The key this host imported for the TPM is not its key: it fails the protector's key check (exported from another copy of the TPM?).\n")
	}
	// The ways out are its Remedies, which front ends list after this.
	b.WriteString("Ways out:")
	return b.String()
}

// Is reports whether target is errdefs.ErrPermissionDenied.
func (e *MissingKeyError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

// Remedies are the ways out: bring an admitted guardian here, have a host
// that can open the TPM admit this one, import the TPM's key, or give up
// the old state.
func (e *MissingKeyError) Remedies() []errdefs.Remedy {
	const elsewhere = "on a host that can open the TPM"
	var rs []errdefs.Remedy
	if e.WrongImportedKey {
		rs = append(rs, errdefs.Do(errdefs.ActionKeyImport, "replace", "true").WithNote("import the right key"))
	}
	export := errdefs.Do(errdefs.ActionGuardianExport, "file", "G.p12")
	if len(e.Rows) == 1 {
		export.Args["guardian"] = e.Rows[0].Name
	}
	return append(rs,
		export.WithNote("import one of the admitted guardians: export it").On("where it lives"),
		errdefs.Do(errdefs.ActionGuardianImport, "file", "G.p12").WithNote("then import it here"),
		errdefs.Do(errdefs.ActionGuardianExportCerts, "file", "host.pem").WithNote("or grant this host from a host that can open the TPM: export this host's certificates"),
		errdefs.Do(errdefs.ActionProtectorGrant, "certs", "host.pem").WithNote("then grant them").On(elsewhere),
		errdefs.Do(errdefs.ActionGuardianTrust, "certs", "owner.pem").WithNote("and trust the TPM's owner here, by its certificates exported where it lives"),
		errdefs.Do(errdefs.ActionKeyExport).WithNote("or import the TPM's key: export it").On(elsewhere),
		errdefs.Do(errdefs.ActionKeyImport).WithNote("then import it here"),
		errdefs.Do(errdefs.ActionTPMReprovision, "tpm", e.Dir).WithNote("or give up the old state and start a fresh TPM (kept as a backup)"),
	)
}
