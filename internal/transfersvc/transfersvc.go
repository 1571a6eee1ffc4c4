// Package transfersvc is the host service's part in moving, copying and
// deploying stopped VMs between hosts (TransferService, for trusted peers)
// and in fleet-wide operations (FleetService, for this host's CLI): the
// CLI asks its local service, which talks to its peers.
package transfersvc

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/errdefs"
	"vtpm/internal/fleet"
	"vtpm/internal/hostd"
	"vtpm/internal/transfer"
	"vtpm/internal/vm"
)

// Services are the API services for s: TransferService for its peers,
// FleetService for this host's CLI. Register them before s runs.
func Services(s *hostd.Server) []hostd.Service {
	svc := &service{s: s}
	tp, th := hostv1connect.NewTransferServiceHandler(&transferService{service: svc})
	fp, fh := hostv1connect.NewFleetServiceHandler(&fleetService{service: svc})
	return []hostd.Service{{Path: tp, Handler: th, Remote: true}, {Path: fp, Handler: fh, Local: true}}
}

// service is what both services share: the host service they are part of.
type service struct {
	s *hostd.Server
}

func (v *service) name() string         { return v.s.Name() }
func (v *service) log() *slog.Logger    { return v.s.Logger() }
func (v *service) fail(err error) error { return apierr.ToConnect(err, v.s.Name()) }

// registry is this host's VMs, with keys: a transfer manufactures, opens
// and re-keys TPMs. Each use opens the keystore anew (it takes no lock),
// with the hardware TPM the service's own keystore uses.
func (v *service) registry() *vm.Registry {
	h := vm.NewRegistry(v.s.DataRoot(), v.s.OpenKeys)
	h.Log = v.log()
	return h
}

// transferService implements TransferService: what this host does for a
// trusted peer.
type transferService struct {
	hostv1connect.UnimplementedTransferServiceHandler
	*service
}

var _ hostv1connect.TransferServiceHandler = (*transferService)(nil)

func bundleRequest(m *hostv1.BundleRequest, from string) *transfer.Request {
	return &transfer.Request{Op: vm.Op(m.GetOp()), Config: m.GetConfig(), TPM: vm.TPMMode(m.GetTpm()),
		Protector: m.GetProtector(), Data: m.GetDataBytes(), From: from}
}

func (t *transferService) PreflightReceive(ctx context.Context, req *connect.Request[hostv1.PreflightReceiveRequest]) (*connect.Response[hostv1.PreflightReceiveResponse], error) {
	_, err := transfer.Preflight(t.registry(), bundleRequest(req.Msg.GetRequest(), hostd.PeerFrom(ctx)))
	if err != nil {
		return nil, t.fail(err)
	}
	return connect.NewResponse(&hostv1.PreflightReceiveResponse{}), nil
}

func (t *transferService) ReceiveBundle(ctx context.Context, stream *connect.ClientStream[hostv1.ReceiveBundleRequest]) (*connect.Response[hostv1.ReceiveBundleResponse], error) {
	if !stream.Receive() {
		err := stream.Err()
		if err == nil {
			err = errdefs.New(errdefs.ErrInvalidArgument, "an empty bundle stream")
		}
		return nil, t.fail(err)
	}
	head := stream.Msg().GetRequest()
	if head == nil {
		return nil, apierr.ToConnect(errdefs.New(errdefs.ErrInvalidArgument, "a bundle stream starts with its request"), t.name())
	}
	from := hostd.PeerFrom(ctx)
	req := bundleRequest(head, from)
	t.log().Info("receiving a VM", "from", from, "op", req.Op, "tpm", req.TPM, "bytes", req.Data)
	a, err := transfer.Accept(ctx, t.registry(), req, &chunkReader{stream: stream}, transfer.Limits{})
	if err != nil {
		t.log().Warn("refused a VM", "from", from, "op", req.Op, "err", err)
		return nil, t.fail(err)
	}
	t.log().Info("registered a VM", "from", from, "op", req.Op, "vm", a.Name, "uuid", a.UUID, "path", a.Path)
	return connect.NewResponse(&hostv1.ReceiveBundleResponse{Vm: arrivedMsg(a)}), nil
}

// chunkReader reads a bundle stream's chunks as one byte stream.
type chunkReader struct {
	stream *connect.ClientStream[hostv1.ReceiveBundleRequest]
	buf    []byte
}

func (r *chunkReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if !r.stream.Receive() {
			if err := r.stream.Err(); err != nil {
				return 0, err
			}
			return 0, io.EOF
		}
		r.buf = r.stream.Msg().GetChunk()
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func arrivedMsg(a *transfer.Arrived) *hostv1.ArrivedVM {
	if a == nil {
		return nil
	}
	return &hostv1.ArrivedVM{Name: a.Name, Uuid: a.UUID, Path: a.Path, Tpm: a.TPM}
}

func (t *transferService) SetTPMs(ctx context.Context, req *connect.Request[hostv1.SetTPMsRequest]) (*connect.Response[hostv1.SetTPMsResponse], error) {
	rs, err := setTPMs(t.registry(), req.Msg.GetVms(), req.Msg.GetAll(), req.Msg.GetEnable())
	if err != nil {
		return nil, t.fail(err)
	}
	t.log().Info("switched TPMs", "from", hostd.PeerFrom(ctx), "enable", req.Msg.GetEnable(), "vms", len(rs))
	return connect.NewResponse(&hostv1.SetTPMsResponse{Results: resultMsgs(rs, t.name())}), nil
}

func setTPMs(h *vm.Registry, refs []string, all, on bool) (vm.BulkResults, error) {
	refs, err := h.Targets(refs, all)
	if err != nil {
		return nil, err
	}
	rs, _ := h.SetTPMsEnabled(refs, on, all, nil)
	return rs, nil
}

func resultMsgs(rs vm.BulkResults, host string) []*hostv1.VMResult {
	out := make([]*hostv1.VMResult, 0, len(rs))
	for _, r := range rs {
		m := &hostv1.VMResult{Vm: r.VM, Ok: r.OK, Skipped: r.Skipped, Note: r.Note}
		if r.Err != nil {
			m.Error = apierr.Detail(r.Err, host)
		}
		out = append(out, m)
	}
	return out
}

// ResultsFrom turns VM results as the API carries them back into
// vm.BulkResults, each failure an error with its kind and remedies.
func ResultsFrom(ms []*hostv1.VMResult) vm.BulkResults {
	rs := make(vm.BulkResults, 0, len(ms))
	for _, m := range ms {
		r := vm.BulkResult{VM: m.GetVm(), OK: m.GetOk(), Skipped: m.GetSkipped(), Note: m.GetNote()}
		if d := m.GetError(); d != nil {
			r.Err = ErrorFrom(d)
			r.Error = r.Err.Error()
		}
		rs = append(rs, r)
	}
	return rs
}

// ErrorFrom is the error an ErrorDetail describes, with its kind and
// remedies, as apierr.FromConnect makes it.
func ErrorFrom(d *hostv1.ErrorDetail) error {
	ce := connect.NewError(connect.CodeUnknown, errors.New(d.GetMessage()))
	if det, err := connect.NewErrorDetail(d); err == nil {
		ce.AddDetail(det)
	}
	return apierr.FromConnect(ce, "")
}

// fleetService implements FleetService: this host's CLI asking its service
// to act on its peers.
type fleetService struct {
	hostv1connect.UnimplementedFleetServiceHandler
	*service
}

var _ hostv1connect.FleetServiceHandler = (*fleetService)(nil)

// peerDestination is a peer's TransferService as a transfer.Destination.
type peerDestination struct {
	name    string
	client  hostv1connect.TransferServiceClient
	peerErr func(name string, err error) error // the server's PeerError
	host    hostv1connect.HostServiceClient    // for Registered; may be nil
}

var _ transfer.Confirmer = (*peerDestination)(nil)

// Registered implements transfer.Confirmer with the peer's VM list.
func (d *peerDestination) Registered(ctx context.Context, id uuid.UUID) (*transfer.Arrived, error) {
	if d.host == nil {
		return nil, errors.New("no host service client")
	}
	rsp, err := d.host.ListVMs(ctx, connect.NewRequest(&hostv1.ListVMsRequest{}))
	if err != nil {
		return nil, d.peerErr(d.name, err)
	}
	for _, v := range rsp.Msg.GetVms() {
		if v.GetUuid() == id.String() {
			return &transfer.Arrived{Name: v.GetName(), UUID: v.GetUuid(), TPM: TPMState(v)}, nil
		}
	}
	return nil, nil
}

func bundleMsg(r *transfer.Request) *hostv1.BundleRequest {
	return &hostv1.BundleRequest{Op: string(r.Op), Config: r.Config, Tpm: string(r.TPM), Protector: r.Protector, DataBytes: r.Data, From: r.From}
}

func (d *peerDestination) Preflight(ctx context.Context, r *transfer.Request) error {
	_, err := d.client.PreflightReceive(ctx, connect.NewRequest(&hostv1.PreflightReceiveRequest{Request: bundleMsg(r)}))
	if err != nil {
		return d.peerErr(d.name, err)
	}
	return nil
}

func (d *peerDestination) Receive(ctx context.Context, r *transfer.Request, send func(io.Writer) error) (*transfer.Arrived, error) {
	cs := d.client.ReceiveBundle(ctx)
	err := cs.Send(&hostv1.ReceiveBundleRequest{Part: &hostv1.ReceiveBundleRequest_Request{Request: bundleMsg(r)}})
	if err == nil {
		err = send(&chunkWriter{stream: cs})
	}
	rsp, cerr := cs.CloseAndReceive()
	// A peer that refuses the stream ends it: its answer says why, not the
	// failed send.
	if cerr != nil {
		return nil, d.peerErr(d.name, cerr)
	}
	if err != nil {
		return nil, err
	}
	a := rsp.Msg.GetVm()
	return &transfer.Arrived{Name: a.GetName(), UUID: a.GetUuid(), Path: a.GetPath(), TPM: a.GetTpm()}, nil
}

// chunkWriter sends what is written as chunks of a bundle stream.
type chunkWriter struct {
	stream *connect.ClientStreamForClient[hostv1.ReceiveBundleRequest, hostv1.ReceiveBundleResponse]
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	// Send marshals the message before it returns: p may be reused.
	if err := w.stream.Send(&hostv1.ReceiveBundleRequest{Part: &hostv1.ReceiveBundleRequest_Chunk{Chunk: p}}); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (f *fleetService) SendVM(ctx context.Context, req *connect.Request[hostv1.SendVMRequest], out *connect.ServerStream[hostv1.SendVMResponse]) error {
	m := req.Msg
	p, err := f.peer(m.GetTo())
	if err != nil {
		return f.fail(err)
	}
	c, base, err := f.s.PeerClient(p.Name)
	if err != nil {
		return f.fail(err)
	}
	defer c.CloseIdleConnections()
	h := f.registry()
	v, err := h.Open(m.GetVm())
	if err != nil {
		return f.fail(err)
	}
	var last time.Time
	o := transfer.Options{
		Op: vm.Op(m.GetOp()), To: p.Name, Name: m.GetName(), TPM: vm.TPMMode(m.GetTpm()), From: f.name(),
		Progress: func(sent, total int64) {
			if now := time.Now(); now.Sub(last) >= 200*time.Millisecond || sent == total {
				last = now
				out.Send(&hostv1.SendVMResponse{Event: &hostv1.SendVMResponse_Progress{Progress: &hostv1.Progress{SentBytes: sent, TotalBytes: total}}})
			}
		},
	}
	if m.GetGrant() {
		o.Grant = p.Guardian()
	}
	f.log().Info("sending a VM", "vm", v.Name(), "op", o.Op, "to", p.Name)
	dst := &peerDestination{name: p.Name, client: hostv1connect.NewTransferServiceClient(c, base), peerErr: f.s.PeerError,
		host: hostv1connect.NewHostServiceClient(c, base)}
	res, err := transfer.Send(ctx, h, v, dst, o)
	if err != nil {
		f.log().Warn("sending a VM failed", "vm", v.Name(), "op", o.Op, "to", p.Name, "err", err)
		return f.fail(err)
	}
	f.log().Info("sent a VM", "vm", v.Name(), "op", o.Op, "to", p.Name, "bytes", res.Bytes, "took", res.Duration)
	return out.Send(&hostv1.SendVMResponse{Event: &hostv1.SendVMResponse_Result{Result: &hostv1.SendVMResult{
		Op: string(res.Op), Vm: res.VM, To: res.To, Arrived: arrivedMsg(res.Arrived), Bytes: res.Bytes,
		DurationNs: int64(res.Duration), Backup: res.Backup, Notes: res.Notes, Warnings: res.Warnings,
	}}})
}

// peer is the trusted peer called name.
func (v *service) peer(name string) (*hostd.Peer, error) {
	for _, p := range v.s.Peers() {
		if p.Name == name {
			return p, nil
		}
	}
	return nil, errdefs.New(errdefs.ErrNotFound, "host %s trusts no host called %s", v.name(), name).
		With(errdefs.Do(errdefs.ActionHostList).WithNote("the hosts it trusts"))
}

// hostsFor resolves a --hosts value against this host and its peers.
func (v *service) hostsFor(spec string) ([]string, error) {
	var names []string
	for _, p := range v.s.Peers() {
		names = append(names, p.Name)
	}
	return fleet.Hosts(spec, v.name(), names)
}

func timeoutOf(ms int64) time.Duration { return time.Duration(ms) * time.Millisecond }

// onPeer calls peer host's API with a client made by newClient.
func onPeer[C, T any](v *service, host string, newClient func(connect.HTTPClient, string, ...connect.ClientOption) C, call func(C) (T, error)) (T, error) {
	var zero T
	c, base, err := v.s.PeerClient(host)
	if err != nil {
		return zero, err
	}
	defer c.CloseIdleConnections()
	r, err := call(newClient(c, base))
	if err != nil {
		return zero, v.s.PeerError(host, err)
	}
	return r, nil
}

func (f *fleetService) SetTPMs(ctx context.Context, req *connect.Request[hostv1.FleetSetTPMsRequest]) (*connect.Response[hostv1.FleetSetTPMsResponse], error) {
	m := req.Msg
	hosts, err := f.hostsFor(m.GetHosts())
	if err != nil {
		return nil, f.fail(err)
	}
	outs := fleet.Run(ctx, hosts, timeoutOf(m.GetTimeoutMs()), func(ctx context.Context, host string) (vm.BulkResults, error) {
		if host == f.name() {
			return setTPMs(f.registry(), nil, true, m.GetEnable())
		}
		return onPeer(f.service, host, hostv1connect.NewTransferServiceClient, func(c hostv1connect.TransferServiceClient) (vm.BulkResults, error) {
			rsp, err := c.SetTPMs(ctx, connect.NewRequest(&hostv1.SetTPMsRequest{Enable: m.GetEnable(), All: true}))
			if err != nil {
				return nil, err
			}
			return ResultsFrom(rsp.Msg.GetResults()), nil
		})
	})
	rsp := &hostv1.FleetSetTPMsResponse{}
	for _, o := range outs {
		hr := &hostv1.HostResults{Host: o.Host, Reachable: o.Err == nil || !fleet.Unreachable(o.Err), Results: resultMsgs(o.Value, o.Host)}
		if o.Err != nil {
			hr.Error = apierr.Detail(o.Err, o.Host)
		}
		rsp.Hosts = append(rsp.Hosts, hr)
	}
	return connect.NewResponse(rsp), nil
}

func (f *fleetService) ListVMs(ctx context.Context, req *connect.Request[hostv1.FleetListVMsRequest]) (*connect.Response[hostv1.FleetListVMsResponse], error) {
	hosts, err := f.hostsFor(req.Msg.GetHosts())
	if err != nil {
		return nil, f.fail(err)
	}
	outs := fleet.Run(ctx, hosts, timeoutOf(req.Msg.GetTimeoutMs()), func(ctx context.Context, host string) ([]*hostv1.VM, error) {
		if host == f.name() {
			return hostd.VMList(f.s.VMs())
		}
		return onPeer(f.service, host, hostv1connect.NewHostServiceClient, func(c hostv1connect.HostServiceClient) ([]*hostv1.VM, error) {
			rsp, err := c.ListVMs(ctx, connect.NewRequest(&hostv1.ListVMsRequest{}))
			if err != nil {
				return nil, err
			}
			return rsp.Msg.GetVms(), nil
		})
	})
	rsp := &hostv1.FleetListVMsResponse{}
	for _, o := range outs {
		hv := &hostv1.HostVMs{Host: o.Host, Reachable: o.Err == nil || !fleet.Unreachable(o.Err), Vms: o.Value}
		if o.Err != nil {
			hv.Error = apierr.Detail(o.Err, o.Host)
		}
		rsp.Hosts = append(rsp.Hosts, hv)
	}
	return connect.NewResponse(rsp), nil
}

// TPMState is a listed VM's TPM as fleet.VM and transfer.Arrived say it:
// enabled, disabled (it has one, switched off) or none.
func TPMState(v *hostv1.VM) string {
	switch {
	case v.GetTpmEnabled():
		return "enabled"
	case v.GetTpmUuid() != "":
		return "disabled"
	}
	return "none"
}
