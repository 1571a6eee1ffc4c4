package statefile

import (
	"crypto/pbkdf2"
	"crypto/sha512"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"vtpm/internal/swtpm/subopt"
	"vtpm/internal/tpmrc"
)

// Key is an AES key for state or migration encryption: 16 bytes
// (aes-128-cbc) or 32 bytes (aes-256-cbc).
type Key struct {
	Bytes []byte
}

// is256 reports whether k is an AES-256 key.
func (k *Key) is256() bool { return len(k.Bytes) == 32 }

func (k *Key) check() error {
	if k == nil || (len(k.Bytes) != 16 && len(k.Bytes) != 32) {
		n := 0
		if k != nil {
			n = len(k.Bytes)
		}
		return fmt.Errorf("key is %d bytes, want 16 (aes-128-cbc) or 32 (aes-256-cbc): %w", n, tpmrc.TPMBadKeyProperty)
	}
	return nil
}

const (
	hexReadLimit = 68       // swtpm reads at most this much of a hex key file
	pwdReadLimit = 64 << 10 // generous; a longer passphrase is surely a mistake
	pbkdf2Salt   = "swtpm"
	pbkdf2Iter   = 1000
)

// ParseKeyOption parses the value of swtpm's --key or --migration-key:
// file=PATH|fd=N|pwdfile=PATH|pwdfd=N plus mode=, format=, remove and kdf=.
//
// extraFiles maps inherited descriptors the way exec.Cmd.ExtraFiles does:
// fd=3 is extraFiles[0], and so on. A descriptor outside that range is taken
// from the process's own descriptor table and closed after reading; files in
// extraFiles stay open and belong to the caller.
func ParseKeyOption(s string, extraFiles ...*os.File) (*Key, error) {
	opts, err := subopt.Parse(s, "file", "fd", "pwdfile", "pwdfd", "mode", "format", "remove", "kdf")
	if err != nil {
		return nil, err
	}

	keyLen := 16
	switch mode := opts["mode"]; mode {
	case "", "aes-cbc", "aes-128-cbc":
	case "aes-256-cbc":
		keyLen = 32
	default:
		return nil, fmt.Errorf("mode=%q: unsupported, use aes-128-cbc or aes-256-cbc", mode)
	}

	binaryFormat := false
	switch f := opts["format"]; f {
	case "", "hex":
	case "binary":
		binaryFormat = true
	default:
		return nil, fmt.Errorf("format=%q: unsupported, use hex or binary", f)
	}

	useSHA512 := false
	switch kdf := opts["kdf"]; kdf {
	case "", "pbkdf2":
	case "sha512":
		useSHA512 = true
	default:
		return nil, fmt.Errorf("kdf=%q: unsupported, use pbkdf2 or sha512", kdf)
	}

	remove := false
	if v, ok := opts["remove"]; ok {
		if remove, err = subopt.Bool("remove", v); err != nil {
			return nil, err
		}
	}

	var sources []string
	for _, name := range []string{"file", "fd", "pwdfile", "pwdfd"} {
		if _, ok := opts[name]; ok {
			sources = append(sources, name)
		}
	}
	switch len(sources) {
	case 0:
		return nil, errors.New("missing key source: give one of file=, fd=, pwdfile= or pwdfd=")
	case 1:
	default:
		return nil, fmt.Errorf("sub-options %s are mutually exclusive; give only one key source", strings.Join(sources, "= and "))
	}
	source := sources[0]
	isPassphrase := strings.HasPrefix(source, "pwd")

	limit := int64(pwdReadLimit)
	if !isPassphrase {
		limit = hexReadLimit
		if binaryFormat {
			limit = int64(keyLen) + 1 // one more, to notice a too-long key
		}
	}
	content, err := readKeySource(source, opts[source], limit, remove, extraFiles)
	if err != nil {
		return nil, err
	}

	var key []byte
	switch {
	case isPassphrase:
		if len(content) == 0 {
			return nil, fmt.Errorf("%s=%s: passphrase is empty", source, opts[source])
		}
		if int64(len(content)) > pwdReadLimit {
			return nil, fmt.Errorf("%s=%s: passphrase is longer than %d bytes", source, opts[source], pwdReadLimit)
		}
		key, err = deriveKey(content, keyLen, useSHA512)
		if err != nil {
			return nil, fmt.Errorf("%s=%s: deriving key: %w", source, opts[source], err)
		}
	case binaryFormat:
		if len(content) != keyLen {
			return nil, fmt.Errorf("%s=%s: binary key must be exactly %d bytes for mode=%s, got %d or more",
				source, opts[source], keyLen, modeName(keyLen), len(content))
		}
		key = content
	default:
		key, err = parseHexKey(content, keyLen)
		if err != nil {
			return nil, fmt.Errorf("%s=%s: %w", source, opts[source], err)
		}
	}
	return &Key{Bytes: key}, nil
}

func modeName(keyLen int) string {
	if keyLen == 32 {
		return "aes-256-cbc"
	}
	return "aes-128-cbc"
}

func readKeySource(source, value string, limit int64, remove bool, extraFiles []*os.File) ([]byte, error) {
	switch source {
	case "file", "pwdfile":
		if value == "" {
			return nil, fmt.Errorf("%s= needs a path", source)
		}
		f, err := os.Open(value)
		if err != nil {
			return nil, fmt.Errorf("%s=%s: opening key source: %w", source, value, err)
		}
		defer f.Close()
		data, err := io.ReadAll(io.LimitReader(f, limit))
		if err != nil {
			return nil, fmt.Errorf("%s=%s: reading key source: %w", source, value, err)
		}
		if remove {
			if err := os.Remove(value); err != nil {
				return nil, fmt.Errorf("%s=%s: removing key file as remove= asked: %w", source, value, err)
			}
		}
		return data, nil
	default: // fd, pwdfd
		n, err := strconv.Atoi(value)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%s=%q: want a non-negative file descriptor number", source, value)
		}
		var f *os.File
		if i := n - 3; i >= 0 && i < len(extraFiles) {
			f = extraFiles[i]
		} else {
			f = os.NewFile(uintptr(n), source)
			if f == nil {
				return nil, fmt.Errorf("%s=%d: not a valid file descriptor", source, n)
			}
			defer f.Close()
		}
		data, err := io.ReadAll(io.LimitReader(f, limit))
		if err != nil {
			return nil, fmt.Errorf("%s=%d: reading key source: %w", source, n, err)
		}
		return data, nil
	}
}

// parseHexKey accepts an optional 0x prefix, then exactly 2*keyLen hex
// digits, then whitespace or the end of the data.
func parseHexKey(data []byte, keyLen int) ([]byte, error) {
	s := string(data)
	s = strings.TrimPrefix(s, "0x")
	digits := 0
	for digits < len(s) && isHexDigit(s[digits]) {
		digits++
	}
	if digits < len(s) && !isSpace(s[digits]) {
		return nil, fmt.Errorf("hex key has invalid character %q after %d digits; want only hex digits, optionally prefixed by 0x", s[digits], digits)
	}
	if digits != 2*keyLen {
		return nil, fmt.Errorf("hex key has %d digits, mode=%s needs %d", digits, modeName(keyLen), 2*keyLen)
	}
	key := make([]byte, keyLen)
	for i := range key {
		key[i] = hexVal(s[2*i])<<4 | hexVal(s[2*i+1])
	}
	return key, nil
}

func isHexDigit(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'
}

func hexVal(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	default:
		return c - 'a' + 10
	}
}

// deriveKey turns a passphrase into a key exactly as swtpm does; nothing is
// trimmed from the passphrase, not even a trailing newline.
func deriveKey(passphrase []byte, keyLen int, useSHA512 bool) ([]byte, error) {
	if useSHA512 {
		sum := sha512.Sum512(passphrase)
		return sum[:keyLen], nil
	}
	return pbkdf2.Key(sha512.New, string(passphrase), []byte(pbkdf2Salt), pbkdf2Iter, keyLen)
}
