package seal

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/secret"
)

// Format constants; see doc.go for the layout.
const (
	Magic         = "VTPMSEAL"
	FormatVersion = 1

	headerLen = 52
	nonceLen  = 12
	tagLen    = 16
	// Overhead is the number of bytes a sealed file adds to its plaintext.
	Overhead = headerLen + tagLen

	// MaxPlaintext bounds a state blob; libtpms state is tens of KiB.
	MaxPlaintext = 16 << 20

	keyLen   = 32
	kdfLabel = "vtpm seal v1"
)

// Errors returned (wrapped) by Unseal and Store.Load. Each names a distinct
// cause so callers and users can tell them apart, and each also matches the
// errdefs kind of its failure: damaged, tampered, foreign or rolled-back
// state is errdefs.ErrDataLoss.
var (
	ErrTruncated   = newSentinel("truncated", errdefs.ErrDataLoss)
	ErrNotSealed   = newSentinel("not a vtpm sealed file", errdefs.ErrDataLoss)
	ErrVersion     = newSentinel("unsupported sealed format version", errdefs.ErrFailedPrecondition)
	ErrAuth        = newSentinel("authentication failed (wrong data key, or the file was modified)", errdefs.ErrDataLoss)
	ErrWrongTPM    = newSentinel("state of another TPM", errdefs.ErrDataLoss)
	ErrWrongType   = newSentinel("wrong blob type", errdefs.ErrDataLoss)
	ErrRollback    = newSentinel("older generation than the last one seen (rollback)", errdefs.ErrDataLoss)
	ErrUnknownBlob = newSentinel("unknown state blob name", errdefs.ErrInvalidArgument)
)

// sentinel is an error value tested with errors.Is that also matches the
// errdefs kind of the failure it names.
type sentinel struct {
	msg  string
	kind error
}

func newSentinel(msg string, kind error) error { return &sentinel{msg: msg, kind: kind} }

func (e *sentinel) Error() string { return e.msg }

// Is reports whether target is e's kind (errors.Is matches e itself first).
func (e *sentinel) Is(target error) bool { return target == e.kind }

type blobType uint8

const (
	typePermall       blobType = 1
	typeVolatileState blobType = 2
	typeSaveState     blobType = 3
)

// Names lists the blob names this package stores, in --print-states order.
var Names = []string{"permall", "volatilestate", "savestate"}

func typeOf(name string) (blobType, error) {
	switch name {
	case "permall":
		return typePermall, nil
	case "volatilestate":
		return typeVolatileState, nil
	case "savestate":
		return typeSaveState, nil
	}
	return 0, fmt.Errorf("%w %q: expected permall, volatilestate or savestate", ErrUnknownBlob, name)
}

func (t blobType) String() string {
	switch t {
	case typePermall:
		return "permanent state"
	case typeVolatileState:
		return "volatile state"
	case typeSaveState:
		return "saved state"
	}
	return fmt.Sprintf("unknown blob type %d", uint8(t))
}

type header struct {
	version uint16
	typ     blobType
	gen     uint64
	id      uuid.UUID
	length  uint32
	nonce   [nonceLen]byte
}

func (h *header) marshal() []byte {
	b := make([]byte, headerLen)
	copy(b, Magic)
	binary.BigEndian.PutUint16(b[8:], h.version)
	b[10] = byte(h.typ)
	binary.BigEndian.PutUint64(b[12:], h.gen)
	copy(b[20:36], h.id[:])
	binary.BigEndian.PutUint32(b[36:], h.length)
	copy(b[40:52], h.nonce[:])
	return b
}

// parseHeader checks structure only; nothing in it is trusted until the GCM
// tag verifies.
func parseHeader(file []byte) (header, error) {
	var h header
	if len(file) < len(Magic) {
		if bytes.HasPrefix([]byte(Magic), file) {
			return h, errf(ErrTruncated, "truncated (%d bytes, shorter than the %d-byte header)", len(file), headerLen)
		}
		return h, errf(ErrNotSealed, "not a vtpm sealed file (bad magic)")
	}
	if string(file[:len(Magic)]) != Magic {
		return h, errf(ErrNotSealed, "not a vtpm sealed file (bad magic)")
	}
	if len(file) < 10 {
		return h, errf(ErrTruncated, "truncated (%d bytes, shorter than the %d-byte header)", len(file), headerLen)
	}
	h.version = binary.BigEndian.Uint16(file[8:])
	if h.version != FormatVersion {
		return h, errf(ErrVersion, "sealed with format version %d, this vtpm reads version %d", h.version, FormatVersion).
			with(errdefs.Advise("use a vtpm release that knows the newer format"))
	}
	if len(file) < headerLen {
		return h, errf(ErrTruncated, "truncated (%d bytes, shorter than the %d-byte header)", len(file), headerLen)
	}
	h.typ = blobType(file[10])
	h.gen = binary.BigEndian.Uint64(file[12:])
	copy(h.id[:], file[20:36])
	h.length = binary.BigEndian.Uint32(file[36:])
	copy(h.nonce[:], file[40:52])
	want := sealedSize(h.length)
	switch {
	case uint64(len(file)) < want:
		return h, errf(ErrTruncated, "truncated (%d bytes, the header announces %d)", len(file), want)
	case uint64(len(file)) > want:
		return h, errf(ErrAuth, "authentication failed (%d bytes, the header announces %d: trailing data, or the file was modified)", len(file), want)
	}
	return h, nil
}

func sealedSize(n uint32) uint64 { return uint64(n) + Overhead }

// sealError carries a full message while still matching its sentinel with
// errors.Is, so messages read naturally ("holds state of TPM ..."), and the
// ways out of it as remedies.
type sealError struct {
	msg string
	err error
	fix []errdefs.Remedy
}

func (e *sealError) Error() string { return e.msg }
func (e *sealError) Unwrap() error { return e.err }

// Remedies returns the ways out.
func (e *sealError) Remedies() []errdefs.Remedy { return e.fix }

func (e *sealError) with(fix ...errdefs.Remedy) *sealError {
	e.fix = append(e.fix, fix...)
	return e
}

func errf(sentinel error, format string, args ...any) *sealError {
	return &sealError{msg: fmt.Sprintf(format, args...), err: sentinel}
}

func newAEAD(key []byte) (cipher.AEAD, error) {
	aead, sub, err := newLockedAEAD(key)
	sub.Close()
	return aead, err
}

// newLockedAEAD derives the sealing key from the data key into locked
// memory and builds the AEAD from it. The caller closes the returned key
// memory when done with the AEAD. The AES key schedule the AEAD keeps is
// crypto/aes's own heap copy, out of this package's reach.
func newLockedAEAD(key []byte) (cipher.AEAD, *secret.Bytes, error) {
	if len(key) != keyLen {
		return nil, nil, fmt.Errorf("data key must be %d bytes, got %d", keyLen, len(key))
	}
	derived, err := hkdf.Key(sha256.New, key, nil, kdfLabel, keyLen)
	if err != nil {
		return nil, nil, fmt.Errorf("derive sealing key: %w", err)
	}
	sub, err := secret.From(derived) // wipes derived
	if err != nil {
		return nil, nil, fmt.Errorf("derive sealing key: %w", err)
	}
	block, err := aes.NewCipher(sub.Bytes())
	if err != nil {
		sub.Close()
		return nil, nil, fmt.Errorf("create AES cipher: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		sub.Close()
		return nil, nil, fmt.Errorf("create GCM: %w", err)
	}
	return aead, sub, nil
}

// Seal encrypts plain as blob name of TPM id at generation gen.
func Seal(key []byte, id uuid.UUID, name string, gen uint64, plain []byte) ([]byte, error) {
	aead, err := newAEAD(key)
	if err != nil {
		return nil, err
	}
	return sealWith(aead, id, name, gen, plain)
}

func sealWith(aead cipher.AEAD, id uuid.UUID, name string, gen uint64, plain []byte) ([]byte, error) {
	typ, err := typeOf(name)
	if err != nil {
		return nil, err
	}
	if gen == 0 {
		return nil, errors.New("seal: generation must be at least 1")
	}
	if len(plain) > MaxPlaintext {
		return nil, fmt.Errorf("seal %s: %d bytes exceeds the %d-byte limit", name, len(plain), MaxPlaintext)
	}
	h := header{version: FormatVersion, typ: typ, gen: gen, id: id, length: uint32(len(plain))}
	rand.Read(h.nonce[:]) // never fails (crypto/rand)
	hdr := h.marshal()
	out := make([]byte, headerLen, headerLen+len(plain)+tagLen)
	copy(out, hdr)
	return aead.Seal(out, h.nonce[:], plain, hdr), nil
}

// Unseal verifies and decrypts file, which must hold blob name of TPM id.
// It returns the plaintext and the file's generation.
func Unseal(key []byte, id uuid.UUID, name string, file []byte) (plain []byte, gen uint64, err error) {
	aead, err := newAEAD(key)
	if err != nil {
		return nil, 0, err
	}
	return unsealWith(aead, id, name, file)
}

func unsealWith(aead cipher.AEAD, id uuid.UUID, name string, file []byte) ([]byte, uint64, error) {
	want, err := typeOf(name)
	if err != nil {
		return nil, 0, err
	}
	h, err := parseHeader(file)
	if err != nil {
		return nil, 0, err
	}
	plain, err := aead.Open(nil, h.nonce[:], file[headerLen:], file[:headerLen])
	if err != nil {
		if h.id != id {
			// Unauthenticated hint: most likely another TPM's file under its own key.
			return nil, 0, errf(ErrAuth, "%v; its header names TPM %s, this is TPM %s", ErrAuth, h.id, id)
		}
		return nil, 0, ErrAuth
	}
	if h.id != id {
		clear(plain)
		return nil, 0, errf(ErrWrongTPM, "holds state of TPM %s, this is TPM %s", h.id, id)
	}
	if h.typ != want {
		clear(plain)
		return nil, 0, errf(ErrWrongType, "holds %s, expected %s (%s)", h.typ, want, name)
	}
	if h.gen == 0 {
		clear(plain)
		return nil, 0, errf(ErrAuth, "%v: generation 0 is never written", ErrAuth)
	}
	return plain, h.gen, nil
}
