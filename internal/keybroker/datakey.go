package keybroker

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/secret"
	"vtpm/internal/swtpm/subopt"
)

// ParseDataKey returns the 32-byte data key that a --data-key value names
// (file=PATH or fd=N, with format=hex, the default, or binary), in locked
// memory. It bypasses key protectors: for scripts and tests that manage
// keys themselves.
func ParseDataKey(opt string) (*Key, error) {
	o, err := subopt.Parse(opt, "file", "fd", "format")
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
	defer clear(raw)
	dek, err := decode(raw, o["format"])
	if err != nil {
		return nil, err
	}
	return newKey(uuid.Nil, dek)
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
			return nil, errdefs.New(errdefs.ErrInvalidArgument, "--data-key: binary key has %d bytes, want 32", len(raw))
		}
		return bytes.Clone(raw), nil
	case "", "hex":
		s := strings.TrimPrefix(strings.TrimSpace(string(raw)), "0x")
		k, err := hex.DecodeString(s)
		if err != nil || len(k) != 32 {
			clear(k)
			return nil, errdefs.New(errdefs.ErrInvalidArgument, "--data-key: want 64 hex digits (a 256-bit key), or format=binary")
		}
		return k, nil
	}
	return nil, errdefs.New(errdefs.ErrInvalidArgument, "--data-key: format=%q: want hex or binary", format)
}

// NewDataKeyFile writes a fresh random data key to a new file at path
// (mode 0600, hex), for --data-key file=PATH. The key never passes
// through the caller.
func NewDataKeyFile(path string) error {
	k, err := secret.Random(guardian.DEKSize)
	if err != nil {
		return err
	}
	defer k.Close()
	return writeKeyFile(path, k.Bytes())
}

func writeKeyFile(path string, key []byte) error {
	buf := make([]byte, hex.EncodedLen(len(key)))
	defer clear(buf)
	hex.Encode(buf, key)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("write data key: %w", err)
	}
	_, err = f.Write(buf)
	return errors.Join(err, f.Close())
}
