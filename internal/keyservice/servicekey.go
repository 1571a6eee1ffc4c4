package keyservice

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
	"vtpm/internal/keystore"
)

// ServiceKeySize is the size of the service key in bytes.
const ServiceKeySize = 32

const (
	sealLabel      = "vtpm keyservice seal v1"
	checkLabel     = "vtpm keyservice key check v1"
	initTokenLabel = "vtpm keyservice init token v1"
	sessionLabel   = "vtpm keyservice session v1"
	auditLabel     = "vtpm keyservice audit v1"
)

// serviceKey is the key every node holds: it seals the service's private
// keys (CA, fleet guardian) in etcd, attestation sessions, and derives the
// init token.
type serviceKey struct {
	raw     []byte
	aead    cipher.AEAD
	session cipher.AEAD
	audit   []byte // the audit records' MAC key
	path    string
	storage string // where it is kept, for status
	weaker  bool   // a file, not sealed to a TPM
}

func newServiceKey(raw []byte, path, storage string, weaker bool) (*serviceKey, error) {
	if len(raw) != ServiceKeySize {
		return nil, fmt.Errorf("service key is %d bytes, want %d", len(raw), ServiceKeySize)
	}
	k := &serviceKey{raw: raw, path: path, storage: storage, weaker: weaker}
	var err error
	if k.aead, err = deriveAEAD(raw, sealLabel); err != nil {
		return nil, err
	}
	if k.session, err = deriveAEAD(raw, sessionLabel); err != nil {
		return nil, err
	}
	if k.audit, err = hkdf.Key(sha256.New, raw, nil, auditLabel, 32); err != nil {
		return nil, err
	}
	return k, nil
}

func deriveAEAD(secret []byte, label string) (cipher.AEAD, error) {
	key, err := hkdf.Key(sha256.New, secret, nil, label, 32)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// sealedSuffix names the service key sealed to the host TPM, beside
// where its file would be.
const sealedSuffix = ".tpm"

// loadServiceKey reads the service key: sealed to the host TPM
// (path+".tpm") or a file at path (64 hex digits). When neither exists
// and create is set it makes one, sealed to hostTPM unless that is "" or
// "none" (then a file, mode 0600).
func loadServiceKey(path string, create bool, hostTPM string) (*serviceKey, error) {
	if sealed, err := os.ReadFile(path + sealedSuffix); err == nil {
		spec := hostTPM
		if spec == "none" {
			spec = ""
		}
		raw, err := keystore.UnsealFromHostTPM(spec, sealed)
		if err != nil {
			return nil, fmt.Errorf("the service key %s: %w", path+sealedSuffix, err)
		}
		return newServiceKey(raw, path, fmt.Sprintf("sealed to the host TPM (%s)", path+sealedSuffix), false)
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && create {
		raw := make([]byte, ServiceKeySize)
		rand.Read(raw)
		if hostTPM != "" && hostTPM != "none" {
			sealed, err := keystore.SealToHostTPM(hostTPM, raw)
			if err != nil {
				return nil, err
			}
			if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
				return nil, err
			}
			if err := atomicfile.Write(path+sealedSuffix, sealed, 0o600); err != nil {
				return nil, err
			}
			return newServiceKey(raw, path, fmt.Sprintf("sealed to the host TPM at %s (%s)", hostTPM, path+sealedSuffix), false)
		}
		if err := WriteServiceKey(path, raw); err != nil {
			return nil, err
		}
		return newServiceKey(raw, path, fileStorage(path), true)
	}
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrNotFound, err, "read the service key").With(
			errdefs.Advise("copy the service key file of a node of this cluster here (mode 0600), or add this node with join"))
	}
	raw, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "service key %s is not 64 hex digits", path)
	}
	return newServiceKey(raw, path, fileStorage(path), true)
}

func fileStorage(path string) string {
	return fmt.Sprintf("file %s (mode 0600; weaker than a key sealed to the host's TPM)", path)
}

// SaveServiceKey keeps a node's service key: sealed to hostTPM beside path
// (path+".tpm") unless hostTPM is "" or "none", else as WriteServiceKey.
func SaveServiceKey(path string, raw []byte, hostTPM string) error {
	if hostTPM == "" || hostTPM == "none" {
		return WriteServiceKey(path, raw)
	}
	if _, err := os.Stat(path + sealedSuffix); err == nil {
		return errdefs.New(errdefs.ErrAlreadyExists, "service key %s already exists", path+sealedSuffix)
	}
	sealed, err := keystore.SealToHostTPM(hostTPM, raw)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(path+sealedSuffix, sealed, 0o600)
}

// WriteServiceKey writes raw to path as hex, mode 0600, never over an
// existing file.
func WriteServiceKey(path string, raw []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	if _, err := os.Stat(path); err == nil {
		return errdefs.New(errdefs.ErrAlreadyExists, "service key %s already exists", path)
	}
	return atomicfile.Write(path, []byte(hex.EncodeToString(raw)+"\n"), 0o600)
}

// seal encrypts plain for the etcd key name (bound as associated data).
func (k *serviceKey) seal(name string, plain []byte) []byte {
	nonce := make([]byte, k.aead.NonceSize())
	rand.Read(nonce)
	return k.aead.Seal(nonce, nonce, plain, []byte(name))
}

// open decrypts what seal wrote for name.
func (k *serviceKey) open(name string, sealed []byte) ([]byte, error) {
	n := k.aead.NonceSize()
	if len(sealed) < n {
		return nil, fmt.Errorf("sealed %s is truncated", name)
	}
	plain, err := k.aead.Open(nil, sealed[:n], sealed[n:], []byte(name))
	if err != nil {
		return nil, &WrongServiceKeyError{Key: name, Path: k.path}
	}
	return plain, nil
}

// auditMAC authenticates an audit record's hash: whoever can write etcd
// but holds no service key cannot rewrite the chain from a record on.
func (k *serviceKey) auditMAC(hash []byte) []byte {
	m := hmac.New(sha256.New, k.audit)
	m.Write(hash)
	return m.Sum(nil)
}

// check is the value stored in etcd that tells whether a node's service
// key is the cluster's, without revealing it.
func (k *serviceKey) check() []byte {
	c, _ := hkdf.Key(sha256.New, k.raw, nil, checkLabel, 32)
	return c
}

// InitToken derives the token that authorizes Init and Restore from the
// service key: whoever can read a node's service key may bootstrap it.
func InitToken(raw []byte) []byte {
	m := hmac.New(sha256.New, raw)
	m.Write([]byte(initTokenLabel))
	return m.Sum(nil)
}

// ReadInitToken reads the service key at path (or sealed beside it, with
// the host TPM it was sealed through) and returns its init token.
func ReadInitToken(path string) ([]byte, error) {
	k, err := loadServiceKey(path, false, "")
	if err != nil {
		return nil, err
	}
	return InitToken(k.raw), nil
}

// WrongServiceKeyError: a sealed value does not open with this node's
// service key — the node holds another cluster's key. It matches
// errdefs.ErrFailedPrecondition.
type WrongServiceKeyError struct {
	Key  string // the etcd key of the value
	Path string // the service key file
}

func (e *WrongServiceKeyError) Error() string {
	return fmt.Sprintf("%s does not open with the service key in %s: this node holds another cluster's service key", e.Key, e.Path)
}

// Is reports whether target is errdefs.ErrFailedPrecondition.
func (e *WrongServiceKeyError) Is(target error) bool { return target == errdefs.ErrFailedPrecondition }

// Remedies says how to get the right key.
func (e *WrongServiceKeyError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{errdefs.Advise("copy the service key file from a node of this cluster (mode 0600), or add this node with join")}
}
