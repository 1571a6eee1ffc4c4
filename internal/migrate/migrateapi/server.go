// Package migrateapi serves live migration on the host service's API: the
// receiving side for trusted peers (MigrationService, over TLS) and the
// sending side for this host's CLI (LocalMigrationService), and reaches a
// peer's receiving side as a migrate.Destination (Remote).
package migrateapi

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"

	"connectrpc.com/connect"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/hostd"
	"vtpm/internal/migrate"
	"vtpm/internal/vm"
)

// Services are the migration services of host service s, to register
// with s.Register. It removes what migrations into this host left
// half-done when the service stopped.
func Services(s *hostd.Server) []hostd.Service {
	reg := vm.NewRegistry(s.DataRoot(), s.OpenKeys)
	reg.Log = s.Logger()
	reg.Exe = vtpmExe()
	// The received VM's vTPM drops privileges and adopts its TPM through
	// this service's key socket.
	reg.HostSocket = s.KeySocket()
	if gone, err := reg.CleanIncoming(context.Background()); err != nil || len(gone) > 0 {
		s.Logger().Warn("removed VMs a migration into this host left half-received", "vms", gone, "err", err)
	}
	m := &service{s: s, reg: reg, local: &migrate.Local{Registry: reg, Host: s.Name()}}
	rpath, rh := hostv1connect.NewMigrationServiceHandler(m)
	lpath, lh := hostv1connect.NewLocalMigrationServiceHandler(m)
	return []hostd.Service{{Path: rpath, Handler: rh, Remote: true}, {Path: lpath, Handler: lh, Local: true}}
}

type service struct {
	hostv1connect.UnimplementedMigrationServiceHandler
	hostv1connect.UnimplementedLocalMigrationServiceHandler
	s     *hostd.Server
	reg   *vm.Registry
	local *migrate.Local
}

var (
	_ hostv1connect.MigrationServiceHandler      = (*service)(nil)
	_ hostv1connect.LocalMigrationServiceHandler = (*service)(nil)
)

func (m *service) fail(err error) error { return apierr.ToConnect(err, m.s.Name()) }

// Preflight answers a peer's pre-flight check.
func (m *service) Preflight(ctx context.Context, req *connect.Request[hostv1.MigrationPreflightRequest]) (*connect.Response[hostv1.MigrationPreflightResponse], error) {
	rep, err := m.local.Preflight(ctx, specFromProto(req.Msg.GetSpec()))
	if err != nil {
		return nil, m.fail(err)
	}
	res := &hostv1.MigrationPreflightResponse{Host: rep.Host, Guardian: rep.Guardian, NeedsGrant: rep.NeedsGrant}
	if rep.Refusal != nil {
		res.Refusal = apierr.Detail(rep.Refusal, m.s.Name())
	}
	return connect.NewResponse(res), nil
}

// Prepare gets ready to receive, on the address the peer reached.
func (m *service) Prepare(ctx context.Context, req *connect.Request[hostv1.MigrationPrepareRequest]) (*connect.Response[hostv1.MigrationPrepareResponse], error) {
	if a, ok := ctx.Value(http.LocalAddrContextKey).(net.Addr); ok {
		if host, _, err := net.SplitHostPort(a.String()); err == nil {
			ctx = migrate.WithListenIP(ctx, host)
		}
	}
	inc, err := m.local.Prepare(ctx, &migrate.PrepareRequest{Spec: specFromProto(req.Msg.GetSpec()), SourceCA: req.Msg.GetSourceCa()})
	if err != nil {
		m.s.Metrics().Migration("destination", hostd.MigrationFailed)
		return nil, m.fail(err)
	}
	res := &hostv1.MigrationPrepareResponse{MigrateUri: inc.MigrateURI, NbdHost: inc.NBDHost, NbdPort: inc.NBDPort, Ca: inc.CA, Exports: map[int32]string{}}
	for i, e := range inc.Exports {
		res.Exports[int32(i)] = e
	}
	return connect.NewResponse(res), nil
}

// Ready answers whether the VM still waits.
func (m *service) Ready(ctx context.Context, req *connect.Request[hostv1.MigrationVMRequest]) (*connect.Response[hostv1.MigrationVMResponse], error) {
	if err := m.local.Ready(ctx, req.Msg.GetVm()); err != nil {
		return nil, m.fail(err)
	}
	return connect.NewResponse(&hostv1.MigrationVMResponse{}), nil
}

// Commit runs and registers the received VM.
func (m *service) Commit(ctx context.Context, req *connect.Request[hostv1.MigrationVMRequest]) (*connect.Response[hostv1.MigrationVMResponse], error) {
	if err := m.local.Commit(ctx, req.Msg.GetVm()); err != nil {
		m.s.Metrics().Migration("destination", hostd.MigrationFailed)
		return nil, m.fail(err)
	}
	m.s.Metrics().Migration("destination", hostd.MigrationSucceeded)
	return connect.NewResponse(&hostv1.MigrationVMResponse{}), nil
}

// Abort removes what Prepare made.
func (m *service) Abort(ctx context.Context, req *connect.Request[hostv1.MigrationVMRequest]) (*connect.Response[hostv1.MigrationVMResponse], error) {
	if err := m.local.Abort(context.WithoutCancel(ctx), req.Msg.GetVm()); err != nil {
		return nil, m.fail(err)
	}
	m.s.Metrics().Migration("destination", hostd.MigrationCanceled)
	return connect.NewResponse(&hostv1.MigrationVMResponse{}), nil
}

// Migrate moves a VM of this host to a trusted peer, streaming progress.
func (m *service) Migrate(ctx context.Context, req *connect.Request[hostv1.MigrateRequest], stream *connect.ServerStream[hostv1.MigrateEvent]) error {
	to := req.Msg.GetTo()
	c, base, err := m.s.PeerClient(to)
	if err != nil {
		return m.fail(err)
	}
	defer c.CloseIdleConnections()
	remote := &Remote{Host: to, Client: hostv1connect.NewMigrationServiceClient(c, base),
		Explain: func(err error) error { return m.s.PeerError(to, err) }}
	src := &migrate.Source{Registry: m.reg, Host: m.s.Name(), Log: m.s.Logger()}
	var sendErr error
	res, err := src.Migrate(ctx, req.Msg.GetVm(), remote, migrate.Options{Grant: req.Msg.GetGrant(), Progress: func(p migrate.Progress) {
		if sendErr == nil {
			sendErr = stream.Send(&hostv1.MigrateEvent{Event: &hostv1.MigrateEvent_Progress{Progress: ProgressToProto(p)}})
		}
	}})
	if err != nil {
		outcome := hostd.MigrationFailed
		var pe *migrate.PreflightError
		if errors.As(err, &pe) {
			outcome = hostd.MigrationCanceled
		}
		m.s.Metrics().Migration("source", outcome)
		return m.fail(err)
	}
	m.s.Metrics().Migration("source", hostd.MigrationSucceeded)
	return stream.Send(&hostv1.MigrateEvent{Event: &hostv1.MigrateEvent_Result{Result: resultToProto(res)}})
}

// vtpmExe is the vtpm executable that runs vTPM instances: beside this
// one, else in PATH ("" leaves the registry's default).
func vtpmExe() string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "vtpm")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	p, _ := exec.LookPath("vtpm")
	return p
}
