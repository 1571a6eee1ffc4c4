package migrateapi

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/migrate"
	"vtpm/internal/vm"
)

// Remote is a destination host reached over its TLS API.
type Remote struct {
	Host   string
	Client hostv1connect.MigrationServiceClient
	// Explain turns a failed call into data (hostd.Server.PeerError); nil:
	// apierr.FromConnect.
	Explain func(error) error
}

var _ migrate.Destination = (*Remote)(nil)

// Name is the peer's name.
func (d *Remote) Name() string { return d.Host }

func (d *Remote) err(err error) error {
	if d.Explain != nil {
		return d.Explain(err)
	}
	return apierr.FromConnect(err, "on "+d.Host)
}

// Preflight asks the peer.
func (d *Remote) Preflight(ctx context.Context, spec *vm.IncomingSpec) (*migrate.Report, error) {
	res, err := d.Client.Preflight(ctx, connect.NewRequest(&hostv1.MigrationPreflightRequest{Spec: specToProto(spec)}))
	if err != nil {
		return nil, d.err(err)
	}
	rep := &migrate.Report{Host: res.Msg.GetHost(), Guardian: res.Msg.GetGuardian(), NeedsGrant: res.Msg.GetNeedsGrant()}
	if r := res.Msg.GetRefusal(); r != nil {
		rep.Refusal = fromDetail(r, "on "+d.Host)
	}
	return rep, nil
}

// Prepare asks the peer to get ready.
func (d *Remote) Prepare(ctx context.Context, req *migrate.PrepareRequest) (*migrate.Incoming, error) {
	res, err := d.Client.Prepare(ctx, connect.NewRequest(&hostv1.MigrationPrepareRequest{Spec: specToProto(req.Spec), SourceCa: req.SourceCA}))
	if err != nil {
		return nil, d.err(err)
	}
	m := res.Msg
	inc := &migrate.Incoming{MigrateURI: m.GetMigrateUri(), NBDHost: m.GetNbdHost(), NBDPort: m.GetNbdPort(), CA: m.GetCa(), Exports: map[int]string{}}
	for i, e := range m.GetExports() {
		inc.Exports[int(i)] = e
	}
	return inc, nil
}

// fromDetail is a refusal the peer sent as data, as an error.
func fromDetail(d *hostv1.ErrorDetail, where string) error {
	ce := connect.NewError(connect.CodeFailedPrecondition, errors.New(d.GetMessage()))
	if det, err := connect.NewErrorDetail(d); err == nil {
		ce.AddDetail(det)
	}
	return apierr.FromConnect(ce, where)
}

func (d *Remote) call(ctx context.Context, f func(context.Context, *connect.Request[hostv1.MigrationVMRequest]) (*connect.Response[hostv1.MigrationVMResponse], error), name string) error {
	if _, err := f(ctx, connect.NewRequest(&hostv1.MigrationVMRequest{Vm: name})); err != nil {
		return d.err(err)
	}
	return nil
}

// Ready asks the peer.
func (d *Remote) Ready(ctx context.Context, name string) error {
	return d.call(ctx, d.Client.Ready, name)
}

// Commit asks the peer.
func (d *Remote) Commit(ctx context.Context, name string) error {
	return d.call(ctx, d.Client.Commit, name)
}

// Abort asks the peer.
func (d *Remote) Abort(ctx context.Context, name string) error {
	return d.call(ctx, d.Client.Abort, name)
}
