package instance

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"vtpm/internal/libtpms"
	"vtpm/internal/paths"
	"vtpm/internal/seal"
	"vtpm/internal/swtpm"
	"vtpm/internal/swtpm/statefile"
)

// store is where libtpms' blobs live: vtpm's sealed format or swtpm's files.
type store interface {
	libtpms.Storage
	Close() error
}

// Format names a state format.
type Format string

const (
	FormatSealed Format = "sealed"
	FormatSwtpm  Format = "swtpm"
)

// chooseFormat keeps an existing swtpm state in swtpm's format (so a libvirt VM
// keeps its TPM), uses it too when --key asks for swtpm's encryption, and
// otherwise seals.
func chooseFormat(cfg *swtpm.Config) Format {
	if cfg.Key != "" || (cfg.StateDir != "" && statefile.HasState(cfg.StateDir) && !seal.Exists(cfg.StateDir)) {
		return FormatSwtpm
	}
	return FormatSealed
}

// openStore opens the state directory in its format and proves, before any
// client is served, that the existing state can be read.
func openStore(cfg *swtpm.Config, fileKey *statefile.Key, log *slog.Logger) (store, Format, error) {
	if cfg.StateFile != "" {
		return nil, "", fmt.Errorf("--tpmstate backend-uri=file://%s: the linear file backend is not supported; use dir://", cfg.StateFile)
	}
	format := chooseFormat(cfg)
	switch format {
	case FormatSwtpm:
		if err := os.MkdirAll(cfg.StateDir, 0o750); err != nil {
			return nil, "", fmt.Errorf("create state directory: %w", err)
		}
		d, err := statefile.OpenDir(cfg.StateDir, fileKey, cfg.StateMode)
		if err != nil {
			return nil, "", err
		}
		if err := d.Init(); err != nil {
			d.Close()
			return nil, "", err
		}
		return d, format, nil
	}
	key, err := dataKey(cfg.DataKey)
	if err != nil {
		return nil, "", err
	}
	mode := os.FileMode(0o600)
	if cfg.StateModeSet {
		mode = cfg.StateMode
	}
	s, err := seal.Open(cfg.StateDir, seal.Options{
		Key:           key,
		Generations:   seal.NewFileGenerations(filepath.Join(paths.DataRoot(), "generations")),
		AllowRollback: cfg.AllowRollback,
		FileMode:      mode,
		Logger:        log,
	})
	clear(key)
	if err != nil {
		return nil, "", err
	}
	for _, name := range []string{"permall", "volatilestate"} {
		if _, err := s.Load(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.Close()
			return nil, "", fmt.Errorf("TPM state in %s cannot be opened; nothing was changed: %w", cfg.StateDir, err)
		}
	}
	return s, format, nil
}

// dataKey reads the 32-byte sealing key from --data-key, or the host key
// (created on first use) when none is given. The key-management layer
// replaces the host key with per-TPM keys under guardians.
func dataKey(opt string) ([]byte, error) {
	if opt == "" {
		return hostKey(filepath.Join(paths.DataRoot(), "host.key"))
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
		if _, err = fmt.Sscanf(o["fd"], "%d", &fd); err == nil {
			f := os.NewFile(uintptr(fd), "data-key")
			raw, err = readAllClose(f)
		}
	default:
		return nil, errors.New("--data-key: give file=PATH or fd=N")
	}
	if err != nil {
		return nil, fmt.Errorf("--data-key: read key: %w", err)
	}
	return decodeKey(raw, o["format"])
}

func readAllClose(f *os.File) ([]byte, error) {
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 1024))
}

func decodeKey(raw []byte, format string) ([]byte, error) {
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

// hostKey reads the host's sealing key, creating it on first use.
func hostKey(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, fmt.Errorf("create data root: %w (set VTPM_HOME to a writable directory)", err)
		}
		k := make([]byte, 32)
		rand.Read(k)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, fs.ErrExist) {
			return hostKey(path) // another process created it first
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
	if err != nil {
		return nil, fmt.Errorf("read host key %s: %w", path, err)
	}
	k, err := decodeKey(raw, "hex")
	if err != nil {
		return nil, fmt.Errorf("host key %s is damaged: %w", path, err)
	}
	return k, nil
}

// states lists the stored blobs for --print-states.
func states(s store) ([]swtpm.StateInfo, error) {
	var out []swtpm.StateInfo
	switch s := s.(type) {
	case *seal.Store:
		st, err := s.States()
		if err != nil {
			return nil, err
		}
		for _, x := range st {
			out = append(out, swtpm.StateInfo{Name: x.Name, Size: x.Size})
		}
	case *statefile.Dir:
		st, err := s.States()
		if err != nil {
			return nil, err
		}
		for _, x := range st {
			out = append(out, swtpm.StateInfo{Name: x.Name, Size: x.Size})
		}
	}
	return out, nil
}
