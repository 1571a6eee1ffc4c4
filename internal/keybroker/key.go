package keybroker

import (
	"crypto/subtle"
	"fmt"
	"io"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/guardian"
	"vtpm/internal/keyfile"
	"vtpm/internal/seal"
	"vtpm/internal/secret"
)

// Key is a TPM's data key, held in locked memory (package secret) and wiped
// by Close. It is never handed out: it opens the TPM's sealed state,
// derives the TPM's migration key, and wraps itself for a guardian or a
// passphrase file. Only this package and seal see the key's bytes.
type Key struct {
	tpm uuid.UUID // uuid.Nil when the TPM is not known (--data-key)
	mem *secret.Bytes
}

// newKey moves dek into locked memory (wiping dek).
func newKey(tpm uuid.UUID, dek []byte) (*Key, error) {
	if len(dek) != guardian.DEKSize {
		clear(dek)
		return nil, fmt.Errorf("data key is %d bytes, want %d", len(dek), guardian.DEKSize)
	}
	mem, err := secret.From(dek)
	if err != nil {
		return nil, err
	}
	return &Key{tpm: tpm, mem: mem}, nil
}

// randomKey is a fresh data key for TPM tpm.
func randomKey(tpm uuid.UUID) (*Key, error) {
	mem, err := secret.Random(guardian.DEKSize)
	if err != nil {
		return nil, err
	}
	return &Key{tpm: tpm, mem: mem}, nil
}

func (k *Key) bytes() []byte {
	if k == nil {
		return nil
	}
	return k.mem.Bytes()
}

// TPM is the UUID of the TPM the key belongs to, uuid.Nil when it came from
// --data-key (the key itself does not say).
func (k *Key) TPM() uuid.UUID { return k.tpm }

// LockErr is nil when the key is locked in memory; otherwise it says why
// not (see secret.Bytes.LockErr).
func (k *Key) LockErr() error { return k.mem.LockErr() }

// Close wipes the key. It is safe to call twice and on nil.
func (k *Key) Close() {
	if k != nil {
		k.mem.Close()
	}
}

// OpenStore opens the sealed state in dir with this key: seal.Open with
// opts, whose Key it sets.
func (k *Key) OpenStore(dir string, opts seal.Options) (*seal.Store, error) {
	if k.bytes() == nil {
		return nil, fmt.Errorf("open sealed state in %s: the data key is closed", dir)
	}
	opts.Key = k.bytes()
	return seal.Open(dir, opts)
}

// MigrationKey derives the key of the TPM's migration stream (see
// guardian.MigrationKey) into locked memory; the caller closes it.
func (k *Key) MigrationKey() (*secret.Bytes, error) {
	if k.bytes() == nil {
		return nil, fmt.Errorf("derive the migration key: the data key is closed")
	}
	return secret.From(guardian.MigrationKey(k.bytes()))
}

// Grant admits g to protector p, which must be this key's (see
// guardian.Protector.Grant); owner signs it.
func (k *Key) Grant(p *guardian.Protector, g, owner *guardian.Guardian) error {
	return p.Grant(k.bytes(), g, owner)
}

// Export returns the key as a passphrase-protected key file (keyfile
// package, default parameters) for `key import` on another host.
func (k *Key) Export(passphrase string, created time.Time) ([]byte, error) {
	return keyfile.Encrypt(keyfile.Key{TPM: k.tpm, DEK: k.bytes(), Created: created}, passphrase, nil)
}

// Equal reports, in constant time, whether k and o are the same key.
func (k *Key) Equal(o *Key) bool {
	return k.bytes() != nil && subtle.ConstantTimeCompare(k.bytes(), o.bytes()) == 1
}

// NewProtector returns a protector for TPM id with a fresh data key, owned
// by owner and admitting others; the key is dropped (wiped) once wrapped.
func NewProtector(id uuid.UUID, owner *guardian.Guardian, others ...*guardian.Guardian) (*guardian.Protector, error) {
	k, err := randomKey(id)
	if err != nil {
		return nil, err
	}
	defer k.Close()
	return guardian.NewProtector(id, k.bytes(), owner, others...)
}

// GrantProtector opens protector p with one of gs, admits g and re-signs p
// with owner, without the data key leaving this package.
func GrantProtector(p *guardian.Protector, gs []*guardian.Guardian, g, owner *guardian.Guardian) error {
	dek, _, err := p.Open(gs)
	if err != nil {
		return err
	}
	defer clear(dek)
	return p.Grant(dek, g, owner)
}

// Unseal verifies and decrypts one sealed file of the key's TPM (see
// seal.Unseal), for tools that check state file by file.
func (k *Key) Unseal(name string, file []byte) (plain []byte, gen uint64, err error) {
	return seal.Unseal(k.bytes(), k.tpm, name, file)
}

// WriteDataKeyFile writes the key to a new file at path (mode 0600, hex) in
// the form --data-key file=PATH reads, for scripts and tests that manage a
// TPM's key themselves.
func (k *Key) WriteDataKeyFile(path string) error {
	if k.bytes() == nil {
		return fmt.Errorf("write data key: the key is closed")
	}
	return writeKeyFile(path, k.bytes())
}

// WriteTo writes the key's bytes to w: the host service sends them to an
// authorized vTPM process on its socket, which reads them with [ReadKey].
func (k *Key) WriteTo(w io.Writer) (int64, error) {
	if k.bytes() == nil {
		return 0, fmt.Errorf("send the data key: the key is closed")
	}
	n, err := w.Write(k.bytes())
	return int64(n), err
}

// ReadKey reads the data key of TPM tpm, as [Key.WriteTo] wrote it, from r
// straight into locked memory.
func ReadKey(r io.Reader, tpm uuid.UUID) (*Key, error) {
	mem, err := secret.New(guardian.DEKSize)
	if err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(r, mem.Bytes()); err != nil {
		mem.Close()
		return nil, fmt.Errorf("read the data key: %w", err)
	}
	return &Key{tpm: tpm, mem: mem}, nil
}
