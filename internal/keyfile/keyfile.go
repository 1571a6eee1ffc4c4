package keyfile

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"golang.org/x/crypto/argon2"
)

// Version is the format version written by Encrypt.
const Version = 1

// DEKSize is the size of the data key a key file holds.
const DEKSize = 32

const (
	magic      = "VTPM-KEY"
	saltSize   = 16
	nonceSize  = 12
	headerSize = 8 + 2 + 4 + 4 + 1 + 1 + saltSize + nonceSize // 48
	plainSize  = 16 + DEKSize + 8                             // 56
	fileSize   = headerSize + plainSize + 16                  // 120
)

// Limits on the Argon2id parameters read from a file: they are used before
// the file is authenticated, so a damaged or hostile file must not be able
// to ask for unbounded work.
var (
	maxTime      uint32 = 64
	maxMemoryKiB uint32 = 4 << 20 // 4 GiB
)

var (
	// ErrWrongPassphrase is returned by Decrypt when authentication fails.
	ErrWrongPassphrase = errors.New("keyfile: wrong passphrase, or the file was modified")

	// ErrUnsupportedVersion is returned by Decrypt for a format version it
	// does not know.
	ErrUnsupportedVersion = errors.New("keyfile: unsupported format version")

	// ErrTruncated is returned by Decrypt for a file shorter than its format
	// requires.
	ErrTruncated = errors.New("keyfile: file is truncated")

	// ErrNotKeyFile is returned by Decrypt when the data does not start with
	// the key file magic.
	ErrNotKeyFile = errors.New("keyfile: not a vtpm key file")
)

// Params are the Argon2id cost parameters (RFC 9106).
type Params struct {
	Time    uint32 // passes over memory
	Memory  uint32 // KiB
	Threads uint8
}

// DefaultParams are RFC 9106's second recommended option: 3 passes over
// 64 MiB with 4 lanes, about a tenth of a second on a current machine.
var DefaultParams = Params{Time: 3, Memory: 64 << 10, Threads: 4}

func (p Params) check() error {
	switch {
	case p.Time < 1 || p.Time > maxTime:
		return fmt.Errorf("keyfile: Argon2id time %d outside 1..%d", p.Time, maxTime)
	case p.Threads < 1:
		return errors.New("keyfile: Argon2id threads must be at least 1")
	case p.Memory < 8*uint32(p.Threads) || p.Memory > maxMemoryKiB:
		return fmt.Errorf("keyfile: Argon2id memory %d KiB outside %d..%d KiB", p.Memory, 8*uint32(p.Threads), maxMemoryKiB)
	}
	return nil
}

// A Key is the content of a key file: one TPM's data key.
type Key struct {
	TPM     uuid.UUID
	DEK     []byte
	Created time.Time // stored to the second
}

// Encrypt returns a key file holding k, encrypted under passphrase with
// Argon2id (params, or DefaultParams if nil) and AES-256-GCM. A zero
// k.Created is replaced by the current time.
func Encrypt(k Key, passphrase string, params *Params) ([]byte, error) {
	if passphrase == "" {
		return nil, errors.New("keyfile: empty passphrase; choose one")
	}
	if len(k.DEK) != DEKSize {
		return nil, fmt.Errorf("keyfile: data key is %d bytes, want %d", len(k.DEK), DEKSize)
	}
	p := DefaultParams
	if params != nil {
		p = *params
	}
	if err := p.check(); err != nil {
		return nil, err
	}
	created := k.Created
	if created.IsZero() {
		created = time.Now()
	}

	b := make([]byte, headerSize, fileSize)
	copy(b, magic)
	binary.BigEndian.PutUint16(b[8:], Version)
	binary.BigEndian.PutUint32(b[10:], p.Time)
	binary.BigEndian.PutUint32(b[14:], p.Memory)
	b[18] = p.Threads
	b[19] = 0
	salt, nonce := b[20:20+saltSize], b[20+saltSize:headerSize]
	rand.Read(salt)
	rand.Read(nonce)

	plain := make([]byte, 0, plainSize)
	plain = append(plain, k.TPM[:]...)
	plain = append(plain, k.DEK...)
	plain = binary.BigEndian.AppendUint64(plain, uint64(created.Unix()))

	aead := newAEAD(passphrase, salt, p)
	return aead.Seal(b, nonce, plain, b[:headerSize]), nil
}

func newAEAD(passphrase string, salt []byte, p Params) cipher.AEAD {
	key := argon2.IDKey([]byte(passphrase), salt, p.Time, p.Memory, p.Threads, 32)
	block, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // the key is 32 bytes
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	return aead
}

// Decrypt opens a key file written by Encrypt. It checks, in order, the
// magic (ErrNotKeyFile), the version (ErrUnsupportedVersion), the size
// (ErrTruncated), the cost parameters, and then authenticates the whole file
// (ErrWrongPassphrase).
func Decrypt(data []byte, passphrase string) (Key, error) {
	if len(data) < len(magic) {
		if bytes.HasPrefix([]byte(magic), data) {
			return Key{}, fmt.Errorf("%w: %d bytes, want %d", ErrTruncated, len(data), fileSize)
		}
		return Key{}, ErrNotKeyFile
	}
	if string(data[:len(magic)]) != magic {
		return Key{}, fmt.Errorf("%w (it does not start with %q)", ErrNotKeyFile, magic)
	}
	if len(data) < 10 {
		return Key{}, fmt.Errorf("%w: %d bytes, want %d", ErrTruncated, len(data), fileSize)
	}
	if v := binary.BigEndian.Uint16(data[8:]); v != Version {
		return Key{}, fmt.Errorf("%w %d (this vtpm reads version %d); use a newer vtpm", ErrUnsupportedVersion, v, Version)
	}
	if len(data) < fileSize {
		return Key{}, fmt.Errorf("%w: %d bytes, want %d; copy the file again", ErrTruncated, len(data), fileSize)
	}
	if len(data) > fileSize {
		return Key{}, fmt.Errorf("keyfile: %d bytes of trailing data after the key; the file is corrupt or not a vtpm key file", len(data)-fileSize)
	}
	p := Params{
		Time:    binary.BigEndian.Uint32(data[10:]),
		Memory:  binary.BigEndian.Uint32(data[14:]),
		Threads: data[18],
	}
	if err := p.check(); err != nil {
		return Key{}, fmt.Errorf("%w; the file is corrupt", err)
	}
	if data[19] != 0 {
		return Key{}, errors.New("keyfile: reserved header byte is not zero; the file is corrupt")
	}
	header := data[:headerSize]
	salt, nonce := header[20:20+saltSize], header[20+saltSize:]
	plain, err := newAEAD(passphrase, salt, p).Open(nil, nonce, data[headerSize:], header)
	if err != nil {
		return Key{}, ErrWrongPassphrase
	}
	k := Key{
		DEK:     plain[16 : 16+DEKSize],
		Created: time.Unix(int64(binary.BigEndian.Uint64(plain[16+DEKSize:])), 0),
	}
	copy(k.TPM[:], plain[:16])
	return k, nil
}
