package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/hostcert"
	"vtpm/internal/qmp"
	"vtpm/internal/vm"
)

// Local is a destination host served in this process: the receiving side
// of a migration, which a host service runs for a peer's requests.
type Local struct {
	Registry *vm.Registry
	// Host is this host's name; IP the address QEMU listens on for the
	// stream and NBD (an address the source reaches; "": the one a
	// Prepare's context carries, WithListenIP).
	Host string
	IP   string
	// Options for the received VM's QEMU; SerialSocket, when set, gives
	// a VM's serial console socket by its name.
	Accel        string
	SerialSocket func(vm string) string

	mu  sync.Mutex
	vms map[string]*qmp.Conn
}

// Name is the host's name.
func (l *Local) Name() string { return l.Host }

// Preflight checks the VM against this host.
func (l *Local) Preflight(ctx context.Context, spec *vm.IncomingSpec) (*Report, error) {
	k, err := l.Registry.Keys()
	if err != nil {
		return nil, err
	}
	g, err := k.Local()
	k.Close()
	if err != nil {
		return nil, err
	}
	certs, err := g.ExportCertificates()
	if err != nil {
		return nil, err
	}
	rep := &Report{Host: l.Host, Guardian: certs}
	if _, err := l.Registry.PreflightIncoming(ctx, spec); err != nil {
		var ie *vm.IncomingError
		if !errors.As(err, &ie) && errdefs.KindOf(err) == errdefs.ErrInternal {
			return nil, err
		}
		rep.Refusal = err
		rep.NeedsGrant = missingKey(err)
	}
	return rep, nil
}

// Prepare makes the VM ready to receive.
func (l *Local) Prepare(ctx context.Context, req *PrepareRequest) (_ *Incoming, err error) {
	var c struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(req.Spec.Config, &c); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "the VM's configuration")
	}
	o := vm.IncomingOptions{Accel: l.Accel}
	if l.SerialSocket != nil {
		o.SerialSocket = l.SerialSocket(c.Name)
	}
	v, err := l.Registry.PrepareIncoming(ctx, req.Spec, o)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			l.Abort(context.WithoutCancel(ctx), v.Name())
		}
	}()
	q, err := l.Registry.DialQMP(ctx, v)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	if l.vms == nil {
		l.vms = map[string]*qmp.Conn{}
	}
	l.vms[v.Name()] = q
	l.mu.Unlock()

	ip := l.IP
	if ip == "" {
		ip, _ = ctx.Value(listenIPKey{}).(string)
	}
	if net.ParseIP(ip) == nil {
		return nil, fmt.Errorf("no address to receive VM %s on (%q)", v.Name(), ip)
	}
	k, err := l.Registry.Keys()
	if err != nil {
		return nil, err
	}
	id, err := localIdentity(k, l.Host, ip)
	k.Close()
	if err != nil {
		return nil, err
	}
	uid, gid, err := vm.QEMUUserOf(v)
	if err != nil {
		return nil, err
	}
	ca := append(append([]byte{}, req.SourceCA...), hostcert.CertsPEM(id.Issuer)...)
	if err := addTLSCreds(ctx, q, "server", id, ca, uid, gid); err != nil {
		return nil, err
	}
	if err := q.SetMigrationCapabilities(ctx, map[string]bool{"return-path": true}); err != nil {
		return nil, err
	}
	if _, err := q.Execute(ctx, "migrate-set-parameters", map[string]any{"tls-creds": tlsID}); err != nil {
		return nil, err
	}
	inc := &Incoming{NBDHost: ip, Exports: map[int]string{}, CA: hostcert.CertsPEM(id.Issuer)}
	devs, err := q.QueryBlock(ctx)
	if err != nil {
		return nil, err
	}
	for i, d := range v.Config.Disks {
		if req.Spec.Disks[i].Shared {
			continue
		}
		if inc.NBDPort == "" {
			if inc.NBDPort, err = freePort(ip); err != nil {
				return nil, err
			}
			if _, err := q.Execute(ctx, "nbd-server-start", map[string]any{
				"addr":      map[string]any{"type": "inet", "data": map[string]any{"host": ip, "port": inc.NBDPort}},
				"tls-creds": tlsID,
			}); err != nil {
				return nil, fmt.Errorf("serve the disks over NBD: %w", err)
			}
		}
		node := ""
		for _, dev := range devs {
			if dev.Device == vm.DiskDevice(i) && dev.Inserted != nil {
				node = dev.Inserted.NodeName
			}
		}
		if node == "" {
			return nil, fmt.Errorf("QEMU has no drive %s for disk %s", vm.DiskDevice(i), d.Path)
		}
		export := fmt.Sprintf("disk%d", i)
		if _, err := q.Execute(ctx, "block-export-add", map[string]any{
			"type": "nbd", "id": "vtpm-migrate-" + export, "node-name": node, "name": export, "writable": true,
		}); err != nil {
			return nil, fmt.Errorf("export disk %s over NBD: %w", d.Path, err)
		}
		inc.Exports[i] = export
	}
	port, err := freePort(ip)
	if err != nil {
		return nil, err
	}
	inc.MigrateURI = "tcp:" + net.JoinHostPort(ip, port)
	if _, err := q.Execute(ctx, "migrate-incoming", map[string]any{"uri": inc.MigrateURI}); err != nil {
		return nil, fmt.Errorf("wait for the migration stream: %w", err)
	}
	return inc, nil
}

// Ready checks that the VM's QEMU still waits for the stream.
func (l *Local) Ready(ctx context.Context, name string) error {
	l.mu.Lock()
	q := l.vms[name]
	l.mu.Unlock()
	if q == nil {
		return errdefs.New(errdefs.ErrNotFound, "no VM %s is being received here", name)
	}
	st, err := q.Status(ctx)
	if err != nil {
		return err
	}
	if st != "inmigrate" {
		return errdefs.New(errdefs.ErrFailedPrecondition, "the VM being received is %s, not waiting for its stream", st)
	}
	return nil
}

// Commit waits for the stream to be loaded, stops serving the disks,
// resumes the guest and registers the VM.
func (l *Local) Commit(ctx context.Context, name string) error {
	l.mu.Lock()
	q := l.vms[name]
	l.mu.Unlock()
	if q == nil {
		return errdefs.New(errdefs.ErrNotFound, "no VM %s is being received here", name)
	}
	v, err := l.Registry.IncomingVM(name)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(time.Minute)
	for {
		st, err := q.Status(ctx)
		if err != nil {
			return err
		}
		if st == "paused" {
			break
		}
		if st != "inmigrate" || time.Now().After(deadline) {
			m, _ := q.QueryMigrate(ctx)
			return errdefs.New(errdefs.ErrFailedPrecondition, "the received VM is %s, not paused and complete (migration %s %s)", st, m.Status, m.ErrorDesc)
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	if _, err := q.Execute(ctx, "nbd-server-stop", nil); err != nil && !errors.Is(err, errdefs.ErrFailedPrecondition) {
		return err
	}
	if _, err := q.Execute(ctx, "cont", nil); err != nil {
		return fmt.Errorf("resume the guest: %w", err)
	}
	if err := l.Registry.CommitIncoming(v); err != nil {
		return err
	}
	l.mu.Lock()
	delete(l.vms, name)
	l.mu.Unlock()
	q.Close()
	return nil
}

// Abort stops and removes a VM being received.
func (l *Local) Abort(ctx context.Context, name string) error {
	l.mu.Lock()
	q := l.vms[name]
	delete(l.vms, name)
	l.mu.Unlock()
	if q != nil {
		q.Close()
	}
	v, err := l.Registry.IncomingVM(name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil // nothing was made, or it is gone already
	}
	if err != nil {
		return err
	}
	return l.Registry.AbortIncoming(ctx, v)
}

type listenIPKey struct{}

// WithListenIP tells a Local with no IP of its own the address to receive
// on: for a host service, the address the source reached it at.
func WithListenIP(ctx context.Context, ip string) context.Context {
	return context.WithValue(ctx, listenIPKey{}, ip)
}

// freePort picks a TCP port free on ip for QEMU to listen on.
func freePort(ip string) (string, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), nil
}

func parseIPs(s string) []net.IP {
	if ip := net.ParseIP(s); ip != nil {
		return []net.IP{ip}
	}
	return nil
}
