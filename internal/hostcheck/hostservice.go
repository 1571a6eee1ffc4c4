package hostcheck

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"slices"
	"strings"

	"vtpm/internal/errdefs"
	"vtpm/internal/hostsvc"
)

// HostServiceCheck reports whether the host service answers on socket
// (hostsvc.SocketPath() when empty): its socket is there, a connection is
// accepted, a ping is answered, and whom it answers. vTPMs that do not run
// as root (libvirt's, as tss) open their keys through it; a host that runs
// none needs no service, so nothing here is worse than a warning.
func HostServiceCheck(socket string) Check {
	const name = "host service"
	if socket == "" {
		socket = hostsvc.SocketPath()
	}
	start := []errdefs.Remedy{
		errdefs.Do(errdefs.ActionHostServiceStart).WithNote("start the host service (as root)"),
		errdefs.Do(errdefs.ActionHostServe, "socket", socket).WithNote("or run it in the foreground, as root"),
	}
	const why = "vTPMs that do not run as root (libvirt's, as tss) cannot open their keys"
	st, err := os.Stat(socket)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return warn(name, fmt.Sprintf("no socket at %s: the host service is not running; %s", socket, why), start...)
	case err != nil:
		return warn(name, fmt.Sprintf("%s: %v; %s", socket, err, why), start...)
	case st.Mode().Type() != fs.ModeSocket:
		return warn(name, fmt.Sprintf("%s is not a socket; %s", socket, why),
			advise("move %s aside", socket), start[0], start[1])
	}
	s, err := hostsvc.Client{Socket: socket}.Ping()
	var u *hostsvc.UnavailableError
	switch {
	case errors.As(err, &u):
		return warn(name, fmt.Sprintf("%s does not answer (%v): the host service stopped, or hangs; %s", socket, u.Err, why), start...)
	case err != nil:
		return warn(name, fmt.Sprintf("the host service at %s refused a ping (%v): it may be older than this vtpm", socket, err),
			advise("restart the host service (systemctl restart vtpm-host.service) after installing this version"))
	}
	users := append([]string{"root"}, s.Users...)
	detail := fmt.Sprintf("answering at %s for %s", socket, strings.Join(users, ", "))
	if len(s.Unknown) > 0 {
		return warn(name, fmt.Sprintf("%s; no such user here: %s", detail, strings.Join(s.Unknown, ", ")),
			advise("correct \"users\" in %s in the host's data root, and restart the service", hostsvc.ConfigFile))
	}
	// libvirt runs its vTPMs as tss: a host that has the user but whose
	// service does not answer it cannot serve libvirt's TPMs.
	if tss, err := user.Lookup("tss"); err == nil && !slices.Contains(s.Users, "tss") && !slices.Contains(s.Users, tss.Uid) {
		return warn(name, detail+"; not for tss, the user libvirt runs its vTPMs as",
			advise("add \"tss\" to \"users\" in %s in the host's data root, and restart the service", hostsvc.ConfigFile))
	}
	return ok(name, detail)
}
