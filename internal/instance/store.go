package instance

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"

	"vtpm/internal/hostkey"
	"vtpm/internal/libtpms"
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

// chooseFormat keeps existing sealed state sealed (even when --key is given,
// as libvirt keeps passing it after `vtpm state import`), keeps an existing
// swtpm state in swtpm's format (so a libvirt VM keeps its TPM), uses swtpm's
// format too when --key asks for its encryption, and otherwise seals.
func chooseFormat(cfg *swtpm.Config) Format {
	switch {
	case cfg.StateDir != "" && seal.Exists(cfg.StateDir):
		return FormatSealed
	case cfg.Key != "" || (cfg.StateDir != "" && statefile.HasState(cfg.StateDir)):
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
	if cfg.Key != "" {
		log.Warn("the state directory holds vtpm sealed state: --key does not apply to it; it is sealed with the data key", "state", cfg.StateDir)
	}
	key, err := hostkey.DataKey(cfg.DataKey)
	if err != nil {
		return nil, "", err
	}
	mode := os.FileMode(0o600)
	if cfg.StateModeSet {
		mode = cfg.StateMode
	}
	s, err := seal.Open(cfg.StateDir, seal.Options{
		Key:           key,
		Generations:   hostkey.Generations(),
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
