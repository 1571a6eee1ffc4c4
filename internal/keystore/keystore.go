package keystore

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"

	"vtpm/internal/errdefs"
	"vtpm/internal/secret"
)

// Sentinel errors. The errors returned by this package wrap one of them
// (match with errors.Is) and carry a message naming the cause and the fix.
// Each sentinel matches one errdefs kind.
var (
	// ErrCorrupt: a record or the master key file is damaged or does not
	// decrypt under this keystore's master key (errdefs.ErrDataLoss).
	ErrCorrupt error = errdefs.New(errdefs.ErrDataLoss, "keystore is corrupt")
	// ErrHostTPMChanged: the master key is sealed to a TPM other than the
	// one reachable now (the host TPM was cleared or replaced;
	// errdefs.ErrFailedPrecondition).
	ErrHostTPMChanged error = errdefs.New(errdefs.ErrFailedPrecondition, "host TPM changed")
	// ErrHostTPMMissing: the master key is sealed to a host TPM (or a TPM
	// was explicitly configured) and no TPM is reachable
	// (errdefs.ErrUnavailable).
	ErrHostTPMMissing error = errdefs.New(errdefs.ErrUnavailable, "host TPM missing")
	// ErrPermission: the keystore (or the host TPM) cannot be accessed, or
	// the keystore directory is accessible to other users
	// (errdefs.ErrPermissionDenied).
	ErrPermission error = errdefs.New(errdefs.ErrPermissionDenied, "keystore permission problem")
)

// Error is the detailed error type of this package. It matches its
// sentinel and, when there is one, the underlying cause with errors.Is;
// Fix holds the ways out that are vtpm operations.
type Error struct {
	Msg   string
	Kind  error // one of the sentinels
	Cause error // may be nil
	Fix   []errdefs.Remedy
}

func (e *Error) Error() string { return e.Msg }

// Remedies returns the ways out.
func (e *Error) Remedies() []errdefs.Remedy { return e.Fix }

// Unwrap returns the sentinel and the cause.
func (e *Error) Unwrap() []error {
	if e.Cause == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Cause}
}

func errf(kind, cause error, format string, args ...any) *Error {
	return &Error{Msg: fmt.Sprintf(format, args...), Kind: kind, Cause: cause}
}

// with adds ways out to e.
func (e *Error) with(fix ...errdefs.Remedy) *Error {
	e.Fix = append(e.Fix, fix...)
	return e
}

// Ways out shared by several failures.
var (
	// ownDataRoot: a user without access to the host's keystore can keep
	// a keystore of their own.
	ownDataRoot = errdefs.Advise("or set VTPM_HOME to your own data root")
	// recoverGuardians: guardians in a keystore that cannot be read any
	// more come back from their exports.
	recoverGuardians = errdefs.Do(errdefs.ActionGuardianImport)
)

// runAsOwner is the way out of a keystore path this user cannot reach.
func runAsOwner(path string) errdefs.Remedy {
	return errdefs.Do(errdefs.ActionRunAsOwner, "path", path)
}

// Options configures Open.
type Options struct {
	// HostTPM selects the master key's protection when the keystore is
	// created: "" = auto (/dev/tpmrm0 if it opens, else file), "none" =
	// file, "device:/dev/tpmrm0", "tcp:127.0.0.1:2321" (a swtpm-style raw
	// TPM command port). When an existing keystore is sealed to a TPM, ""
	// means the TPM it was sealed through. The CLI reads it from
	// $VTPM_HOST_TPM; this package does not.
	HostTPM string
	// Logger receives creation notices and warnings; nil means slog.Default().
	Logger *slog.Logger
}

// Protection says how the master key is protected.
type Protection struct {
	Kind   string // "tpm" or "file"
	Detail string // human-readable, for `vtpm doctor`
}

const (
	masterKeyLen  = 32
	masterFile    = "master.key"
	masterTPMFile = "master.tpm"
	lockFile      = ".lock"
	genKind       = "generations"

	recMagic   = "VTKS"
	recVersion = 1
	recHeader  = 5
	nonceLen   = 12
	recLabel   = "vtpm keystore record v1"
)

var (
	// Record kinds and names are checked by hand: compiling regexps at
	// package init costs every vTPM process start about a millisecond.
	kindRE = charsetMatcher{first: "abcdefghijklmnopqrstuvwxyz", rest: "abcdefghijklmnopqrstuvwxyz0123456789-", max: 64}
	nameRE = charsetMatcher{first: alnum + "_@+-", rest: alnum + "._@+-", max: 200}
	// geteuid is a seam for tests that check ownership as another user.
	geteuid = os.Geteuid
)

// Keystore is an open keystore. Its methods are safe for concurrent use,
// and several processes may open the same keystore at once.
type Keystore struct {
	dir  string
	aead cipher.AEAD
	// genSecret derives the key of each TPM's generation record; wiped by Close.
	genSecret *secret.Bytes
	prot      Protection
	log       *slog.Logger

	mu     sync.Mutex // serialises writers in this process; guards lock, closed
	lock   *os.File   // dir/.lock, opened on first write
	closed bool
}

// Open opens the keystore in dir (normally <data root>/keystore), creating
// it with mode 0700 and a fresh master key on first use.
func Open(dir string, opts Options) (*Keystore, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	dir = filepath.Clean(dir)
	if err := prepareDir(dir); err != nil {
		return nil, err
	}
	master, prot, err := loadMaster(dir, opts, log)
	if errors.Is(err, fs.ErrNotExist) {
		master, prot, err = createMaster(dir, opts, log)
	}
	if err != nil {
		return nil, err
	}
	// The master key and everything derived from it live in locked memory.
	mk, err := secret.From(master) // wipes master
	if err != nil {
		return nil, err
	}
	defer mk.Close()
	aead, err := lockedAEAD(mk.Bytes(), recLabel)
	if err != nil {
		return nil, fmt.Errorf("derive keystore record key: %w", err)
	}
	derived, err := hkdf.Key(sha256.New, mk.Bytes(), nil, genSecretInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("derive keystore generation key: %w", err)
	}
	genSecret, err := secret.From(derived)
	if err != nil {
		return nil, err
	}
	return &Keystore{dir: dir, aead: aead, genSecret: genSecret, prot: prot, log: log}, nil
}

// prepareDir creates dir (0700) if needed and refuses one that is not a
// private directory of the current user.
func prepareDir(dir string) error {
	st, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
			return permOr(err, "create the data root %s for the keystore: %v; create it (mode 0700) or set VTPM_HOME to a writable directory", filepath.Dir(dir), err)
		}
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return permOr(err, "create keystore directory %s: %v; make %s writable by this user, or set VTPM_HOME to a writable directory", dir, err, filepath.Dir(dir))
		}
		if err := syncDir(filepath.Dir(dir)); err != nil {
			return err
		}
		st, err = os.Lstat(dir)
	}
	if err != nil {
		return permOr(err, "inspect keystore directory %s: %v", dir, err).with(runAsOwner(dir), ownDataRoot)
	}
	if st.Mode()&fs.ModeSymlink != 0 || !st.IsDir() {
		return errf(ErrPermission, nil, "keystore %s is not a directory (%s); move it aside so vtpm can create the keystore, or restore the directory from backup", dir, st.Mode().Type())
	}
	if s, ok := st.Sys().(*syscall.Stat_t); ok && int(s.Uid) != geteuid() {
		return errf(ErrPermission, nil, "keystore directory %s is owned by uid %d, but vtpm runs as uid %d", dir, s.Uid, geteuid()).with(runAsOwner(dir), ownDataRoot)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return errf(ErrPermission, nil, "keystore directory %s has mode %04o, so other users can reach the keys in it; run `chmod 700 %s` (and check nobody copied its files)", dir, perm, dir)
	}
	return nil
}

// permOr classifies an OS error as ErrPermission when it is one.
func permOr(err error, format string, args ...any) *Error {
	kind := ErrPermission
	if !errors.Is(err, fs.ErrPermission) {
		kind = errGeneric
	}
	return errf(kind, err, format, args...)
}

// ownerOr is permOr whose way out of a permission error is to run as the
// owner of path.
func ownerOr(err error, path, format string, args ...any) *Error {
	e := permOr(err, format, args...)
	if e.Kind == ErrPermission {
		e.with(runAsOwner(path))
	}
	return e
}

// errGeneric marks I/O failures that are neither permissions nor
// corruption (disk full, I/O error).
var errGeneric error = errdefs.New(errdefs.ErrUnavailable, "keystore I/O error")

// lockedAEAD derives an AES-256-GCM key from secretKey with HKDF-SHA256
// (info label) into locked memory, builds the AEAD from it and wipes it.
// The AEAD keeps crypto/aes's own copy of the key schedule, on the heap.
func lockedAEAD(secretKey []byte, label string) (cipher.AEAD, error) {
	derived, err := hkdf.Key(sha256.New, secretKey, nil, label, 32)
	if err != nil {
		return nil, err
	}
	key, err := secret.From(derived) // wipes derived
	if err != nil {
		return nil, err
	}
	defer key.Close()
	block, err := aes.NewCipher(key.Bytes())
	if err != nil {
		return nil, fmt.Errorf("create AES cipher: %w", err)
	}
	return cipher.NewGCM(block)
}

// Protection reports how the master key is protected.
func (k *Keystore) Protection() Protection { return k.prot }

// Dir returns the keystore directory.
func (k *Keystore) Dir() string { return k.dir }

func checkKindName(kind, name string) error {
	if !kindRE.MatchString(kind) {
		return fmt.Errorf("keystore record kind %q is invalid: use 1-64 characters a-z, 0-9 and '-', starting with a letter", kind)
	}
	if !nameRE.MatchString(name) {
		return fmt.Errorf("keystore record name %q is invalid: use 1-200 characters A-Z, a-z, 0-9 and ._@+- , not starting with '.'", name)
	}
	return nil
}

func (k *Keystore) path(kind, name string) string {
	return filepath.Join(k.dir, kind, name)
}

func additionalData(kind, name string) []byte {
	ad := make([]byte, 0, recHeader+len(kind)+1+len(name))
	ad = append(ad, recMagic...)
	ad = append(ad, recVersion)
	ad = append(ad, kind...)
	ad = append(ad, 0)
	return append(ad, name...)
}

func (k *Keystore) seal(kind, name string, data []byte) ([]byte, error) {
	out := make([]byte, recHeader+nonceLen, recHeader+nonceLen+len(data)+k.aead.Overhead())
	copy(out, recMagic)
	out[4] = recVersion
	if _, err := rand.Read(out[recHeader:]); err != nil {
		return nil, fmt.Errorf("generate nonce: %w", err)
	}
	return k.aead.Seal(out, out[recHeader:], data, additionalData(kind, name)), nil
}

func (k *Keystore) open(kind, name string, file []byte) ([]byte, error) {
	p := k.path(kind, name)
	fix := "restore it from backup, or delete it and re-create what it held"
	var ways []errdefs.Remedy
	if kind == "guardian" || strings.HasPrefix(kind, "guardian") {
		fix = "restore it from backup, or delete it and recover the guardian from its export"
		ways = append(ways, recoverGuardians)
	}
	switch {
	case len(file) < recHeader+nonceLen+k.aead.Overhead():
		return nil, errf(ErrCorrupt, nil, "keystore record %s is truncated (%d bytes); %s", p, len(file), fix).with(ways...)
	case string(file[:4]) != recMagic:
		return nil, errf(ErrCorrupt, nil, "keystore record %s is not a keystore record (bad magic %q); %s", p, file[:4], fix).with(ways...)
	case file[4] != recVersion:
		return nil, errf(ErrCorrupt, nil, "keystore record %s has unsupported format version %d (this vtpm reads version %d); use a newer vtpm, or %s", p, file[4], recVersion, fix).with(ways...)
	}
	nonce := file[recHeader : recHeader+nonceLen]
	data, err := k.aead.Open(nil, nonce, file[recHeader+nonceLen:], additionalData(kind, name))
	if err != nil {
		return nil, errf(ErrCorrupt, nil, "keystore record %s does not decrypt (it was modified, renamed, or written under another master key); %s", p, fix).with(ways...)
	}
	return data, nil
}

// Put stores data as record kind/name, replacing any previous one. The
// write is crash-safe: readers see the old or the new record, never a mix.
func (k *Keystore) Put(kind, name string, data []byte) error {
	if err := checkKindName(kind, name); err != nil {
		return err
	}
	return k.withLock(func() error { return k.put(kind, name, data) })
}

// put writes a record; the caller holds the lock.
func (k *Keystore) put(kind, name string, data []byte) error {
	file, err := k.seal(kind, name, data)
	if err != nil {
		return err
	}
	kdir, err := k.kindDir(kind)
	if err != nil {
		return err
	}
	k.removeStaleTemps(kdir, name)
	if err := writeFileAtomic(kdir, name, file); err != nil {
		return fmt.Errorf("store keystore record %s/%s: %w", kind, name, err)
	}
	return nil
}

// kindDir creates the directory of a record kind if needed; the caller
// holds the lock.
func (k *Keystore) kindDir(kind string) (string, error) {
	kdir := filepath.Join(k.dir, kind)
	if err := os.Mkdir(kdir, 0o700); err == nil {
		if err := syncDir(k.dir); err != nil {
			return "", err
		}
	} else if !errors.Is(err, fs.ErrExist) {
		return "", permOr(err, "create keystore directory %s: %v; check the owner and mode of %s (it must be 0700 and owned by this user)", kdir, err, k.dir)
	}
	return kdir, nil
}

// removeStaleTemps removes temp files of record name in kdir. Writers hold
// the lock, so any such file is left over from a crash.
func (k *Keystore) removeStaleTemps(kdir, name string) {
	if stale, _ := filepath.Glob(filepath.Join(kdir, "."+name+".tmp-*")); len(stale) > 0 {
		for _, f := range stale {
			os.Remove(f)
		}
	}
}

// Get returns record kind/name. An absent record gives an error wrapping
// fs.ErrNotExist; one that fails to decrypt gives ErrCorrupt naming the file.
func (k *Keystore) Get(kind, name string) ([]byte, error) {
	if err := checkKindName(kind, name); err != nil {
		return nil, err
	}
	p := k.path(kind, name)
	file, err := readFileNoFollow(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("keystore has no %s record %q (%s): %w", kind, name, p, fs.ErrNotExist)
	}
	if err != nil {
		return nil, ownerOr(err, k.dir, "read keystore record %s: %v; check the file is mode 0600", p, err)
	}
	return k.open(kind, name, file)
}

// Delete removes record kind/name. An absent record gives an error
// wrapping fs.ErrNotExist.
func (k *Keystore) Delete(kind, name string) error {
	if err := checkKindName(kind, name); err != nil {
		return err
	}
	return k.withLock(func() error {
		p := k.path(kind, name)
		if err := os.Remove(p); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("keystore has no %s record %q (%s): %w", kind, name, p, fs.ErrNotExist)
			}
			return ownerOr(err, k.dir, "delete keystore record %s: %v", p, err)
		}
		return syncDir(filepath.Dir(p))
	})
}

// List returns the names of the records of a kind, sorted. A kind with no
// records gives an empty list.
func (k *Keystore) List(kind string) ([]string, error) {
	if !kindRE.MatchString(kind) {
		return nil, checkKindName(kind, "x")
	}
	kdir := filepath.Join(k.dir, kind)
	ents, err := os.ReadDir(kdir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, ownerOr(err, k.dir, "list keystore directory %s: %v", kdir, err)
	}
	var names []string
	for _, e := range ents {
		if e.Type().IsRegular() && nameRE.MatchString(e.Name()) {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	return names, nil
}

// Close releases the keystore's lock file. The Keystore must not be used
// afterwards.
func (k *Keystore) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closed = true
	k.genSecret.Close()
	if k.lock == nil {
		return nil
	}
	err := k.lock.Close()
	k.lock = nil
	return err
}

var errClosed = errors.New("keystore is closed")

// withLock runs fn holding the in-process mutex and the cross-process flock.
func (k *Keystore) withLock(fn func() error) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return errClosed
	}
	if k.lock == nil {
		f, err := openLock(k.dir)
		if err != nil {
			return err
		}
		k.lock = f
	}
	if err := flock(k.lock, k.dir); err != nil {
		return err
	}
	defer funlock(k.lock)
	return fn()
}

func readFileNoFollow(p string) ([]byte, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(f); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

const alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// charsetMatcher accepts 1..max bytes: the first from first, the rest from rest.
type charsetMatcher struct {
	first, rest string
	max         int
}

func (m charsetMatcher) MatchString(s string) bool {
	if len(s) == 0 || len(s) > m.max || !strings.ContainsRune(m.first, rune(s[0])) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if !strings.ContainsRune(m.rest, rune(s[i])) {
			return false
		}
	}
	return true
}
