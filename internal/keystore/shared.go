package keystore

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"

	"github.com/google/uuid"

	"vtpm/internal/secret"
)

// Share opens (creating it if needed) the generation record of TPM id and
// returns its open file and the key that opens only that record, for a
// process that cannot open the keystore (an unprivileged vTPM served by the
// host service) to pin with [PinShared]. The caller closes both.
func (g *Generations) Share(id uuid.UUID) (*os.File, *secret.Bytes, error) {
	f, err := g.k.openGenFile(id, true)
	if err != nil {
		return nil, nil, err
	}
	if _, err := f.last(""); err != nil {
		f.f.Close()
		return nil, nil, err
	}
	key, err := g.k.recordKey(id)
	if err != nil {
		f.f.Close()
		return nil, nil, err
	}
	return f.f, key, nil
}

// recordKey is the key of TPM id's generation record (what genAEAD keys
// its AEAD with), in locked memory.
func (k *Keystore) recordKey(id uuid.UUID) (*secret.Bytes, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil, errClosed
	}
	derived, err := hkdf.Key(sha256.New, k.genSecret.Bytes(), nil, genKeyInfo+id.String(), 32)
	if err != nil {
		return nil, fmt.Errorf("derive the generation record key of TPM %s: %w", id, err)
	}
	return secret.From(derived)
}

// PinShared is the generation record of TPM id held by f, an open record
// file, and key, the record's key (see [Generations.Share]): a Pinned for
// a process that never opened the keystore. It takes f; key may be closed
// once it returns. The record is read once, so a wrong file or key fails
// here.
func PinShared(f *os.File, id uuid.UUID, key []byte) (*Pinned, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("generation record key of TPM %s: %w", id, err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		f.Close()
		return nil, err
	}
	g := &genFile{f: f, path: f.Name(), id: id, aead: aead, log: slog.Default()}
	if _, err := g.last(""); err != nil {
		f.Close()
		return nil, fmt.Errorf("generation record of TPM %s handed over by the host service: %w", id, err)
	}
	return &Pinned{f: g}, nil
}
