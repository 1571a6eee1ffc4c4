package transfer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
	"vtpm/internal/vm"
)

// Request is what a destination is asked to take, before any data moves.
type Request struct {
	Op vm.Op `json:"op"`
	// Config is the vm.json the destination registers.
	Config []byte `json:"config"`
	// TPM is what the destination does about the TPM (vm.Outgoing.TPM).
	TPM vm.TPMMode `json:"tpm"`
	// Protector is the key protector of the TPM that travels, if one does:
	// the destination checks that it can open it.
	Protector []byte `json:"protector,omitempty"`
	// Data is the bytes of data the stream will carry.
	Data int64 `json:"data"`
	// From names the sending host, for messages.
	From string `json:"from,omitempty"`
}

// Arrived is a VM registered on the destination.
type Arrived struct {
	Name string `json:"name"`
	UUID string `json:"uuid"`
	Path string `json:"path"`
	TPM  string `json:"tpm"` // vm.Config.TPMStatus
}

// Destination is the host a bundle goes to: this process's own registry in
// tests and benchmarks, a peer's host service otherwise.
type Destination interface {
	// Preflight checks that the destination would take req, with nothing
	// written there.
	Preflight(ctx context.Context, req *Request) error
	// Receive sends the stream (written by send) with req and returns the
	// VM registered from it.
	Receive(ctx context.Context, req *Request, send func(io.Writer) error) (*Arrived, error)
}

// Confirmer is a Destination that can tell whether a VM is registered
// there: a move whose answer was lost asks before it keeps the VM here
// too.
type Confirmer interface {
	// Registered returns the VM with that UUID, or nil.
	Registered(ctx context.Context, id uuid.UUID) (*Arrived, error)
}

// IncomingDir is where bundles arrive before they are verified: beside
// the VMs directory, on the same file system, so the verified bundle is
// renamed into place.
func IncomingDir(h *vm.Registry) string { return filepath.Join(h.Root, "incoming") }

// Preflight is a destination's check of req against h: vm.json is valid
// here (paths confined to the bundle or allowed by this host), its name
// and UUID are free, the data fits, and a TPM that travels opens here.
func Preflight(h *vm.Registry, req *Request) (*vm.Config, error) {
	hc, err := h.HostConfig()
	if err != nil {
		return nil, err
	}
	c, err := vm.ParseConfig(req.Config, filepath.Join(h.VMsDir(), "incoming-vm"), hc)
	if err != nil {
		return nil, err
	}
	if err := h.CheckArrival(c); err != nil {
		return nil, err
	}
	if err := CheckSpace(IncomingDir(h), req.Data); err != nil {
		return nil, err
	}
	switch req.TPM {
	case vm.TPMKeep, vm.TPMCopy:
		if len(req.Protector) == 0 {
			return nil, errdefs.New(errdefs.ErrInvalidArgument, "VM %s's TPM travels, but its key protector was not sent", c.Name)
		}
		p, err := guardian.ParseProtector(req.Protector)
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "the key protector of VM %s", c.Name)
		}
		k, err := h.Keys()
		if err != nil {
			return nil, err
		}
		defer k.Close()
		o, err := k.OpenProtector(filepath.Join(h.VMsDir(), c.Name, vm.TPMDir), p, keybroker.OpenOptions{})
		if err != nil {
			return nil, &ProtectorError{VM: c.Name, TPM: p.TPM(), Err: err}
		}
		o.Close()
	case vm.TPMNew, vm.TPMNone:
	default:
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "unknown TPM mode %q", req.TPM)
	}
	return c, nil
}

// ProtectorError is a TPM that the destination cannot open: Err says
// which guardians its protector admits and which the destination holds.
type ProtectorError struct {
	VM  string
	TPM uuid.UUID
	Err error
}

func (e *ProtectorError) Error() string {
	return fmt.Sprintf("the destination cannot open the TPM of VM %s: %v", e.VM, e.Err)
}

func (e *ProtectorError) Unwrap() error { return e.Err }

// Accept is a destination's receipt of a bundle's stream for req into h:
// verified in a staging directory (see Receive), vm.json checked against
// the manifest and req, then registered by vm.Registry.Arrive. Any failure
// leaves nothing registered and nothing staged.
func Accept(ctx context.Context, h *vm.Registry, req *Request, r io.Reader, lim Limits) (*Arrived, error) {
	want, err := Preflight(h, req)
	if err != nil {
		return nil, err
	}
	travels := req.TPM == vm.TPMKeep || req.TPM == vm.TPMCopy
	got, err := Receive(ctx, r, IncomingDir(h), lim, func(m *Manifest) error {
		if m.VM != want.Name || m.UUID != want.UUID {
			return refuse("", "the manifest is for VM %s (%s), the request for %s (%s)", m.VM, m.UUID, want.Name, want.UUID)
		}
		hasConfig, hasTPM := false, false
		for _, f := range m.Files {
			hasConfig = hasConfig || f.Path == vm.ConfigFile
			hasTPM = hasTPM || strings.HasPrefix(f.Path, vm.TPMDir+"/")
		}
		if !hasConfig {
			return refuse("", "no %s", vm.ConfigFile)
		}
		if hasTPM != travels {
			return refuse("", "TPM state sent: %v; announced: %v", hasTPM, travels)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	defer got.Close()
	b, err := os.ReadFile(filepath.Join(got.Dir, vm.ConfigFile))
	if err == nil && string(b) != string(req.Config) {
		err = refuse(vm.ConfigFile, "differs from the one the request announced")
	}
	if err != nil {
		os.RemoveAll(got.Dir)
		return nil, err
	}
	// libtpms hosts one TPM per process: arrivals that manufacture a TPM
	// take turns in a long-running service.
	arriveMu.Lock()
	res, err := h.Arrive(got.Dir, req.TPM)
	arriveMu.Unlock()
	if err != nil {
		return nil, err
	}
	c := res.VM.Config
	return &Arrived{Name: c.Name, UUID: c.UUID.String(), Path: res.VM.Dir, TPM: c.TPMStatus()}, nil
}

var arriveMu sync.Mutex

// Result is what a transfer did.
type Result struct {
	Op vm.Op  `json:"op"`
	VM string `json:"vm"` // the source VM
	To string `json:"to"`
	*Arrived
	Bytes    int64         `json:"bytes"` // data sent
	Duration time.Duration `json:"duration_ns"`
	// Backup is where a moved VM's TPM state is kept on the source.
	Backup   string   `json:"backup,omitempty"`
	Notes    []string `json:"notes,omitempty"`
	Warnings []string `json:"warnings,omitempty"`
}

// Options describe a transfer.
type Options struct {
	Op   vm.Op
	To   string     // the destination's name, for messages
	Name string     // the new VM's name for a copy or deploy
	TPM  vm.TPMMode // a copy's TPM
	// From names this host to the destination.
	From string
	// Grant, when set, is the destination's guardian (public): a TPM that
	// travels first admits it to its key protector, as the owner would.
	Grant *guardian.Guardian
	// Progress, when set, sees the bytes of data sent so far, of total.
	Progress func(sent, total int64)
}

// Send moves, copies or deploys the stopped VM or template v of h to dst:
// pre-flight on the destination, the stream, and for a move, once the
// destination has registered the VM, the VM leaves this host (its TPM state
// kept as a backup here).
func Send(ctx context.Context, h *vm.Registry, v *vm.VM, dst Destination, o Options) (*Result, error) {
	start := time.Now()
	out, err := h.Outgoing(v, o.Op, o.Name, o.TPM)
	if err != nil {
		return nil, err
	}
	var notes []string
	if o.Grant != nil && out.TPMTravels() {
		if err := grant(h, v, o.Grant); err != nil {
			return nil, err
		}
		notes = append(notes, fmt.Sprintf("granted guardian %s (%s) of %s on the TPM of %s", o.Grant.Name(), o.Grant.Fingerprint(), o.To, v.Name()))
	}
	cfg, err := vm.MarshalConfig(out.Config)
	if err != nil {
		return nil, err
	}
	files := []Source{{Path: vm.ConfigFile, Content: cfg, Mode: 0o644}}
	for _, f := range out.Files {
		files = append(files, Source{Path: f.Rel, Src: f.Src, Mode: f.Mode})
	}
	s, err := Plan(out.Config.Name, out.Config.UUID, files)
	if err != nil {
		return nil, err
	}
	req := &Request{Op: o.Op, Config: cfg, TPM: out.TPM, Data: s.Manifest.DataBytes(), From: o.From}
	if out.TPMTravels() {
		if req.Protector, err = os.ReadFile(filepath.Join(v.TPMDir(), keybroker.ProtectorFile)); err != nil {
			return nil, fmt.Errorf("read the TPM's key protector: %w", err)
		}
	}
	if err := dst.Preflight(ctx, req); err != nil {
		return nil, &PreflightError{VM: v.Name(), To: o.To, Op: o.Op, Name: out.Config.Name, TPMTravels: out.TPMTravels(), Err: err}
	}
	if o.Progress != nil {
		total := req.Data
		s.Progress = func(n int64) { o.Progress(n, total) }
	}
	arrived, err := dst.Receive(ctx, req, func(w io.Writer) error {
		_, err := s.WriteTo(ctx, w)
		return err
	})
	if err != nil && o.Op == vm.OpMove && errors.Is(err, errdefs.ErrUnavailable) {
		// The answer may be what was lost: a VM with this UUID there is
		// this one (pre-flight found the UUID free), registered whole.
		if c, ok := dst.(Confirmer); ok {
			if a, cerr := c.Registered(context.WithoutCancel(ctx), out.Config.UUID); cerr == nil && a != nil {
				notes = append(notes, fmt.Sprintf("%s's answer was lost (%v), but it has VM %s registered", o.To, err, v.Name()))
				arrived, err = a, nil
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%s VM %s to %s: %w", o.Op, v.Name(), o.To, err)
	}
	res := &Result{Op: o.Op, VM: v.Name(), To: o.To, Arrived: arrived, Bytes: req.Data, Notes: append(notes, out.Notes...), Warnings: out.Warnings}
	if o.Op == vm.OpMove {
		del, err := h.Delete(v, false)
		if err != nil {
			return res, errdefs.Wrap(errdefs.ErrInternal, err, "VM %s is registered on %s now, but leaving this host failed; unregister it here", v.Name(), o.To).
				With(errdefs.Do(errdefs.ActionVMUnregister, "vm", v.Name()))
		}
		res.Backup = del.Backup
		if del.Backup != "" {
			res.Notes = append(res.Notes, fmt.Sprintf("the TPM state of %s is kept as a backup on this host in %s", v.Name(), del.Backup))
		}
	}
	res.Duration = time.Since(start)
	return res, nil
}

// grant admits g to the key protector of v's TPM (this host owns it).
func grant(h *vm.Registry, v *vm.VM, g *guardian.Guardian) error {
	k, err := h.Keys()
	if err != nil {
		return err
	}
	defer k.Close()
	if _, err := k.Grant(v.TPMDir(), g); err != nil {
		return fmt.Errorf("grant %s on the TPM of %s: %w", g.Name(), v.Name(), err)
	}
	return nil
}

// PreflightError is a destination's refusal before anything was sent.
type PreflightError struct {
	VM, To string
	Op     vm.Op
	Name   string // the VM's name there
	// TPMTravels: the TPM was to travel, so a destination that cannot
	// open it may be granted.
	TPMTravels bool
	Err        error
}

func (e *PreflightError) Error() string {
	return fmt.Sprintf("pre-flight on %s refused VM %s (nothing was sent): %v", e.To, e.VM, e.Err)
}

func (e *PreflightError) Unwrap() error { return e.Err }

// Remedies: a destination that cannot open the TPM that travels is
// granted by the same command with --grant (this host owns the TPM).
func (e *PreflightError) Remedies() []errdefs.Remedy {
	if !e.TPMTravels || !errors.Is(e.Err, errdefs.ErrPermissionDenied) {
		return nil
	}
	switch e.Op {
	case vm.OpMove:
		return []errdefs.Remedy{errdefs.Do(errdefs.ActionVMMoveGrant, "vm", e.VM, "to", e.To).WithNote("admit %s's guardian to the TPM's key protector, and move", e.To)}
	case vm.OpCopy:
		return []errdefs.Remedy{errdefs.Do(errdefs.ActionVMCopyGrant, "vm", e.VM, "to", e.To, "name", e.Name).WithNote("admit %s's guardian to the TPM's key protector, and copy", e.To)}
	}
	return nil
}

// Local is a destination in this process: h's registry. Tests and the
// benchmark use it; a host service serves the same calls to its peers.
type Local struct {
	Registry *vm.Registry
	Limits   Limits
}

// Preflight implements Destination.
func (l Local) Preflight(_ context.Context, req *Request) error {
	_, err := Preflight(l.Registry, req)
	return err
}

// Registered implements Confirmer.
func (l Local) Registered(_ context.Context, id uuid.UUID) (*Arrived, error) {
	v, err := l.Registry.Open(id.String())
	if errors.Is(err, vm.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &Arrived{Name: v.Name(), UUID: id.String(), Path: v.Dir, TPM: v.Config.TPMStatus()}, nil
}

// Receive implements Destination through a pipe.
func (l Local) Receive(ctx context.Context, req *Request, send func(io.Writer) error) (*Arrived, error) {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(send(pw)) }()
	a, err := Accept(ctx, l.Registry, req, pr, l.Limits)
	pr.CloseWithError(errors.New("receiver done"))
	return a, err
}
