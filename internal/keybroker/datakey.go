package keybroker

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"vtpm/internal/swtpm/subopt"
)

// ParseDataKey returns the 32-byte data key that a --data-key value names
// (file=PATH or fd=N, with format=hex, the default, or binary). It bypasses
// key protectors: for scripts and tests that manage keys themselves.
func ParseDataKey(opt string) ([]byte, error) {
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
