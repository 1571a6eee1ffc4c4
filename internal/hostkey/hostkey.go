// Package hostkey provides the host-level context that seals TPM state: the
// 32-byte data key (from --data-key, or the host key kept under the data
// root and created on first use) and the record of generations seen.
//
// The key-management layer replaces the host key with per-TPM keys under
// guardians.
package hostkey

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"vtpm/internal/paths"
	"vtpm/internal/seal"
	"vtpm/internal/swtpm/statefile"
)

// Path is the host key's file under the data root.
func Path() string { return filepath.Join(paths.DataRoot(), "host.key") }

// Generations is the host's record of the last generation seen of each
// TPM's blobs, kept under the data root, outside every state directory.
func Generations() *seal.FileGenerations {
	return seal.NewFileGenerations(filepath.Join(paths.DataRoot(), "generations"))
}

// DataKey returns the 32-byte sealing key that a --data-key value names
// (file=PATH or fd=N, with format=hex, the default, or binary), or the host
// key when opt is empty.
func DataKey(opt string) ([]byte, error) {
	if opt == "" {
		return Load(Path())
	}
	o, err := statefile.ParseSubOptions(opt, "file", "fd", "format")
	if err != nil {
		return nil, fmt.Errorf("--data-key: %w", err)
	}
	var raw []byte
	switch {
	case o["file"] != "":
		raw, err = os.ReadFile(o["file"])
	case o["fd"] != "":
		var fd int
		if fd, err = strconv.Atoi(o["fd"]); err == nil {
			raw, err = readAllClose(os.NewFile(uintptr(fd), "data-key"))
		}
	default:
		return nil, errors.New("--data-key: give file=PATH or fd=N")
	}
	if err != nil {
		return nil, fmt.Errorf("--data-key: read key: %w", err)
	}
	return decode(raw, o["format"])
}

func readAllClose(f *os.File) ([]byte, error) {
	if f == nil {
		return nil, errors.New("not a valid file descriptor")
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 1024))
}

func decode(raw []byte, format string) ([]byte, error) {
	switch format {
	case "binary":
		if len(raw) != 32 {
			return nil, fmt.Errorf("--data-key: binary key has %d bytes, want 32", len(raw))
		}
		return raw, nil
	case "", "hex":
		s := strings.TrimPrefix(strings.TrimSpace(string(raw)), "0x")
		k, err := hex.DecodeString(s)
		if err != nil || len(k) != 32 {
			return nil, errors.New("--data-key: want 64 hex digits (a 256-bit key), or format=binary")
		}
		return k, nil
	}
	return nil, fmt.Errorf("--data-key: format=%q: want hex or binary", format)
}

// Load reads the host's sealing key at path, creating it (64 hex digits,
// mode 0600) on first use.
func Load(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return create(path)
	}
	if err != nil {
		return nil, fmt.Errorf("read host key %s: %w", path, err)
	}
	k, err := decode(raw, "hex")
	if err != nil {
		return nil, fmt.Errorf("host key %s is damaged: %w", path, err)
	}
	return k, nil
}

func create(path string) ([]byte, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create data root: %w (set VTPM_HOME to a writable directory)", err)
	}
	k := make([]byte, 32)
	rand.Read(k)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return Load(path) // another process created it first
	}
	if err != nil {
		return nil, fmt.Errorf("create host key: %w", err)
	}
	_, err = f.WriteString(hex.EncodeToString(k) + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("write host key %s: %w", path, err)
	}
	return k, nil
}
