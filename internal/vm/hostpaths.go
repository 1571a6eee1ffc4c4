package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
)

// HostConfigFile is the host's VM configuration, in the data root.
const HostConfigFile = "host.json"

const hostConfigFormat = 1

// HostConfig is what this host's administrator allows VMs beyond their
// bundles. A bundle is a directory that travels between hosts, so its
// vm.json cannot grant itself anything: a disk, kernel or initrd outside
// the bundle, and every passthrough device, must be listed here.
type HostConfig struct {
	Format int `json:"format"`
	// AllowedPaths are host files and devices VMs may use. An entry
	// allows that path and, when it is a directory, everything below it.
	AllowedPaths []string `json:"allowed_paths,omitempty"`
}

// Allows reports whether VMs may use the absolute path p.
func (c *HostConfig) Allows(p string) bool {
	if c == nil || !filepath.IsAbs(p) {
		return false
	}
	p = filepath.Clean(p)
	for _, a := range c.AllowedPaths {
		if p == a || strings.HasPrefix(p, strings.TrimSuffix(a, "/")+"/") {
			return true
		}
	}
	return false
}

func (h *Registry) hostConfigPath() string { return filepath.Join(h.Root, HostConfigFile) }

// HostConfig reads the host's configuration; a host without one allows
// nothing outside bundles. The file must belong to the user running vtpm
// (root for a root data root) and be writable by no one else, since it
// decides which host files VMs reach.
func (h *Registry) HostConfig() (*HostConfig, error) {
	p := h.hostConfigPath()
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return &HostConfig{Format: hostConfigFormat}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the host's VM configuration: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if s := st.Sys().(*syscall.Stat_t); int(s.Uid) != os.Geteuid() || st.Mode().Perm()&0o022 != 0 {
		return nil, errdefs.New(errdefs.ErrPermissionDenied,
			"%s is owned by uid %d with mode %04o; it decides which host files VMs may use, so it must belong to uid %d and be writable by no one else",
			p, s.Uid, st.Mode().Perm(), os.Geteuid()).With(errdefs.Advise("chown %d %s && chmod 644 %s", os.Geteuid(), p, p))
	}
	var c HostConfig
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "%s is damaged", p).With(errdefs.Advise("restore it from a backup"))
	}
	if c.Format != hostConfigFormat {
		return nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s has format %d; this vtpm reads format %d", p, c.Format, hostConfigFormat)
	}
	for _, a := range c.AllowedPaths {
		if !filepath.IsAbs(a) || filepath.Clean(a) != a {
			return nil, errdefs.New(errdefs.ErrDataLoss, "%s allows %q, which is not a clean absolute path", p, a)
		}
	}
	return &c, nil
}

// AllowPaths adds absolute paths to the host's allow list and returns
// those that were not on it yet.
func (h *Registry) AllowPaths(paths ...string) (added []string, err error) {
	return h.changeHostConfig(func(c *HostConfig) ([]string, error) {
		var added []string
		for _, p := range paths {
			a, err := filepath.Abs(p)
			if err != nil {
				return nil, err
			}
			if err := checkPathChars(a); err != nil {
				return nil, err
			}
			if !slices.Contains(c.AllowedPaths, a) {
				c.AllowedPaths = append(c.AllowedPaths, a)
				added = append(added, a)
			}
		}
		slices.Sort(c.AllowedPaths)
		return added, nil
	})
}

// DisallowPaths removes paths from the host's allow list and returns those
// that were on it.
func (h *Registry) DisallowPaths(paths ...string) (removed []string, err error) {
	return h.changeHostConfig(func(c *HostConfig) ([]string, error) {
		var removed []string
		for _, p := range paths {
			a, err := filepath.Abs(p)
			if err != nil {
				return nil, err
			}
			if i := slices.Index(c.AllowedPaths, a); i >= 0 {
				c.AllowedPaths = slices.Delete(c.AllowedPaths, i, i+1)
				removed = append(removed, a)
			}
		}
		return removed, nil
	})
}

// changeHostConfig applies f to the host configuration under the
// registry's lock and writes it back when f changed something.
func (h *Registry) changeHostConfig(f func(c *HostConfig) ([]string, error)) (changed []string, err error) {
	err = h.update(func(*registry) error {
		c, err := h.HostConfig()
		if err != nil {
			return err
		}
		if changed, err = f(c); err != nil || len(changed) == 0 {
			return err
		}
		c.Format = hostConfigFormat
		b, err := json.MarshalIndent(c, "", "  ")
		if err != nil {
			return err
		}
		return atomicfile.Write(h.hostConfigPath(), append(b, '\n'), 0o644)
	})
	return changed, err
}
