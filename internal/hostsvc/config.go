package hostsvc

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
)

// Socket locations.
const (
	// DefaultSocket is where the host service listens.
	DefaultSocket = "/run/vtpm/host.sock"
	// SocketEnv names the environment variable that overrides it.
	SocketEnv = "VTPM_HOST_SOCKET"
	// ConfigFile, in the data root, names the users besides root whose
	// processes the service answers.
	ConfigFile = "hostsvc.json"
)

// SocketPath is $VTPM_HOST_SOCKET, else DefaultSocket.
func SocketPath() string {
	if s := os.Getenv(SocketEnv); s != "" {
		return s
	}
	return DefaultSocket
}

// Config is the service's configuration (<data root>/hostsvc.json).
type Config struct {
	// Users are the users (names or numeric ids) besides root whose
	// processes may ask for keys. Absent: tss, the user libvirt runs
	// swtpm and swtpm_setup as.
	Users []string `json:"users"`
}

// DefaultUsers are the users answered without a configuration file.
var DefaultUsers = []string{"tss"}

// ReadConfig reads dataRoot's hostsvc.json; an absent file is the default.
func ReadConfig(dataRoot string) (*Config, error) {
	b, err := os.ReadFile(filepath.Join(dataRoot, ConfigFile))
	if errors.Is(err, fs.ErrNotExist) {
		return &Config{Users: DefaultUsers}, nil
	}
	if err != nil {
		return nil, err
	}
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dataRoot, ConfigFile), err)
	}
	return &c, nil
}

// uids resolves the configured users; names that do not resolve are
// skipped (a host without tss answers root only).
func (c *Config) uids() map[uint32]bool {
	out, _ := c.resolve()
	return out
}

// resolve returns the uids of the configured users (and root's) and the
// names that are no user on this host.
func (c *Config) resolve() (map[uint32]bool, []string) {
	out := map[uint32]bool{0: true}
	var unknown []string
	for _, u := range c.Users {
		id := u
		if lu, err := user.Lookup(u); err == nil {
			id = lu.Uid
		}
		n, err := strconv.ParseUint(id, 10, 32)
		if err != nil {
			unknown = append(unknown, u)
			continue
		}
		out[uint32(n)] = true
	}
	return out, unknown
}
