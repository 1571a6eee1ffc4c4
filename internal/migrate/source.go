package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/hostcert"
	"vtpm/internal/keybroker"
	"vtpm/internal/qmp"
	"vtpm/internal/vm"
)

// Source is the host a VM migrates from.
type Source struct {
	Registry *vm.Registry
	// Host is this host's name, in its TLS certificate.
	Host string
	Log  *slog.Logger
	// PollInterval is how often progress is read (default 200 ms).
	PollInterval time.Duration
}

// Options control one migration.
type Options struct {
	// Grant admits the destination's guardian to the TPM's key protector
	// when the pre-flight finds it missing, as the protector's owner
	// (this host) can.
	Grant bool
	// Progress receives the migration's progress (nil: none).
	Progress func(Progress)
}

// Result is a completed migration.
type Result struct {
	VM   string `json:"vm"`
	Host string `json:"host"`
	// Granted names the guardian a grant admitted, if any.
	Granted string `json:"granted,omitempty"`
	// TotalTime and Downtime are QEMU's (ms): from the start of the
	// migration, and how long the guest was stopped.
	TotalTime int64 `json:"total_time_ms"`
	Downtime  int64 `json:"downtime_ms"`
	// RAMBytes went over the migration stream, DiskBytes to the
	// destination's NBD exports.
	RAMBytes  int64 `json:"ram_bytes"`
	DiskBytes int64 `json:"disk_bytes"`
	// Backup is where this host keeps the TPM state ("" without a TPM).
	Backup string `json:"tpm_backup,omitempty"`
}

func (s *Source) log() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}

func (s *Source) poll() time.Duration {
	if s.PollInterval > 0 {
		return s.PollInterval
	}
	return 200 * time.Millisecond
}

// run is one migration in progress, what the source has set up.
type run struct {
	s        *Source
	o        Options
	v        *vm.VM
	q        *qmp.Conn
	dst      Destination
	host     string
	prepared bool     // the destination was asked to prepare
	nodes    []string // NBD client nodes added
	jobs     []string // mirror jobs started
	creds    bool     // TLS object added
	migrated bool     // migrate was issued
	wasRun   bool     // the guest ran when the migration began
	res      Result
	phase    string
	specs    []*vm.IncomingSpec // made for the destination; their markers go at the end
}

// outgoingSpec describes the VM for the destination; the markers beside
// its shared disks stay until the migration has ended.
func (r *run) outgoingSpec(ctx context.Context) (*vm.IncomingSpec, error) {
	spec, err := r.s.Registry.OutgoingSpec(ctx, r.v, r.q)
	if err != nil {
		return nil, err
	}
	r.specs = append(r.specs, spec)
	return spec, nil
}

// Migrate moves running VM name to dst. On failure the VM keeps running
// here as before and dst is cleaned up; the error is a *PreflightError
// (nothing started) or a *StepError naming the step that failed.
func (s *Source) Migrate(ctx context.Context, name string, dst Destination, o Options) (*Result, error) {
	r := &run{s: s, o: o, dst: dst, host: dst.Name()}
	r.res.Host = r.host
	v, err := s.Registry.Open(name)
	if err != nil {
		return nil, err
	}
	r.v = v
	r.res.VM = v.Name()
	if st := s.Registry.State(v); !st.Running() {
		return nil, &PreflightError{VM: v.Name(), Host: r.host, Refusal: errdefs.New(errdefs.ErrFailedPrecondition,
			"VM %s is not running here: a live migration moves a running VM", v.Name())}
	}
	if r.q, err = s.Registry.DialQMP(ctx, v); err != nil {
		return nil, r.fail(StepPreflight, err)
	}
	defer r.q.Close()
	defer func() {
		for _, s := range r.specs {
			s.RemoveMarkers()
		}
	}()
	spec, err := r.preflight(ctx)
	if err != nil {
		return nil, err
	}
	if err := r.live(ctx, spec); err != nil {
		return nil, err
	}
	return &r.res, nil
}

// preflight checks both sides and grants when asked; it starts nothing.
func (r *run) preflight(ctx context.Context) (*vm.IncomingSpec, error) {
	r.progress("pre-flight", nil)
	st, err := r.q.Status(ctx)
	if err != nil {
		return nil, r.fail(StepPreflight, err)
	}
	if st != "running" && st != "paused" {
		return nil, &PreflightError{VM: r.v.Name(), Host: r.host, Refusal: errdefs.New(errdefs.ErrFailedPrecondition,
			"VM %s is %s here, neither running nor paused", r.v.Name(), st)}
	}
	r.wasRun = st == "running"
	if jobs, err := r.q.QueryBlockJobs(ctx); err != nil || len(jobs) > 0 {
		return nil, &PreflightError{VM: r.v.Name(), Host: r.host, Refusal: errdefs.New(errdefs.ErrFailedPrecondition,
			"VM %s has block jobs running (%v, %v); wait for them to end", r.v.Name(), jobs, err)}
	}
	if m, err := r.q.QueryMigrate(ctx); err == nil && m.Status != "" && m.Status != "none" && !m.Finished() {
		return nil, &PreflightError{VM: r.v.Name(), Host: r.host, Refusal: errdefs.New(errdefs.ErrConflict,
			"VM %s is already migrating (%s)", r.v.Name(), m.Status)}
	}
	spec, err := r.outgoingSpec(ctx)
	if err != nil {
		return nil, r.fail(StepPreflight, err)
	}
	rep, err := r.dst.Preflight(ctx, spec)
	if err != nil {
		return nil, r.fail(StepPreflight, err)
	}
	if rep.Refusal == nil {
		return spec, nil
	}
	g, gerr := guardian.ParseCertificates(rep.Guardian)
	if !rep.NeedsGrant || gerr != nil || !r.o.Grant {
		pe := &PreflightError{VM: r.v.Name(), Host: r.host, Refusal: rep.Refusal}
		if rep.NeedsGrant && gerr == nil {
			pe.Guardian = fmt.Sprintf("%s (fingerprint %s)", g.Name(), g.Fingerprint())
			pe.Fleet = fleetRows(r.s.Registry.Root, spec.Protector)
		}
		return nil, pe
	}
	if err := r.grant(g); err != nil {
		return nil, r.fail(StepGrant, err)
	}
	if spec, err = r.outgoingSpec(ctx); err != nil {
		return nil, r.fail(StepPreflight, err)
	}
	if rep, err = r.dst.Preflight(ctx, spec); err != nil {
		return nil, r.fail(StepPreflight, err)
	}
	if rep.Refusal != nil {
		return nil, &PreflightError{VM: r.v.Name(), Host: r.host, Refusal: rep.Refusal}
	}
	return spec, nil
}

// grant admits g to the TPM's key protector; the running vTPM carries the
// protector it reads when the stream starts.
func (r *run) grant(g *guardian.Guardian) error {
	k, err := r.s.Registry.Keys()
	if err != nil {
		return err
	}
	defer k.Close()
	if _, err := k.Grant(r.v.TPMDir(), g); err != nil {
		return err
	}
	r.res.Granted = fmt.Sprintf("%s (fingerprint %s)", g.Name(), g.Fingerprint())
	r.s.log().Info("granted the destination's guardian", "vm", r.v.Name(), "host", r.host, "guardian", g.Name(), "fingerprint", g.Fingerprint())
	return nil
}

// identity is this host's TLS identity for the migration, and its
// guardian's signing certificate.
func (r *run) identity() (*hostcert.Identity, error) {
	k, err := r.s.Registry.Keys()
	if err != nil {
		return nil, err
	}
	defer k.Close()
	return localIdentity(k, r.s.Host, "")
}

func localIdentity(k *keybroker.Broker, host, ip string) (*hostcert.Identity, error) {
	g, err := k.Local()
	if err != nil {
		return nil, err
	}
	return hostcert.Issue(g, host, parseIPs(ip), time.Hour)
}

// live runs steps 2 to 5.
func (r *run) live(ctx context.Context, spec *vm.IncomingSpec) error {
	id, err := r.identity()
	if err != nil {
		return r.fail(StepTLS, err)
	}
	r.prepared = true
	r.progress("prepare", nil)
	inc, err := r.dst.Prepare(ctx, &PrepareRequest{Spec: spec, SourceCA: hostcert.CertsPEM(id.Issuer)})
	if err != nil {
		return r.fail(StepPrepare, err)
	}
	uid, gid, err := vm.QEMUUserOf(r.v)
	if err != nil {
		return r.fail(StepTLS, err)
	}
	r.creds = true
	if err := addTLSCreds(ctx, r.q, "client", id, append(append([]byte{}, inc.CA...), hostcert.CertsPEM(id.Issuer)...), uid, gid); err != nil {
		return r.fail(StepTLS, err)
	}
	if err := r.mirror(ctx, inc); err != nil {
		return r.fail(StepDisks, err)
	}
	if err := r.migrate(ctx, inc); err != nil {
		return r.fail(StepMemory, err)
	}
	r.progress("commit", nil)
	if err := r.dst.Commit(ctx, r.v.Name()); err != nil {
		return r.fail(StepCommit, err)
	}
	r.progress("retire", nil)
	// QEMU's monitor takes one client: Stop dials its own.
	r.q.Close()
	d, err := r.s.Registry.Retire(context.WithoutCancel(ctx), r.v)
	if err != nil {
		return &StepError{VM: r.v.Name(), Host: r.host, Step: StepRetire, Err: err}
	}
	r.res.Backup = d.Backup
	r.progress("done", nil)
	return nil
}

// mirror copies each disk in the bundle to its NBD export and waits until
// every mirror is in step with the guest's writes.
func (r *run) mirror(ctx context.Context, inc *Incoming) error {
	if len(inc.Exports) == 0 {
		return nil
	}
	port, err := strconv.Atoi(inc.NBDPort)
	if err != nil {
		return fmt.Errorf("the destination's NBD port %q: %w", inc.NBDPort, err)
	}
	for i := range r.v.Config.Disks {
		export, ok := inc.Exports[i]
		if !ok {
			continue
		}
		node := fmt.Sprintf("vtpm-migrate-nbd%d", i)
		job := fmt.Sprintf("vtpm-migrate-mirror%d", i)
		if _, err := r.q.Execute(ctx, "blockdev-add", map[string]any{
			"driver": "nbd", "node-name": node, "export": export, "tls-creds": tlsID,
			"server": map[string]any{"type": "inet", "host": inc.NBDHost, "port": strconv.Itoa(port)},
		}); err != nil {
			return fmt.Errorf("connect to the destination's NBD export %s: %w", export, err)
		}
		r.nodes = append(r.nodes, node)
		if _, err := r.q.Execute(ctx, "blockdev-mirror", map[string]any{
			"job-id": job, "device": vm.DiskDevice(i), "target": node, "sync": "full",
		}); err != nil {
			return fmt.Errorf("mirror disk %s: %w", r.v.Config.Disks[i].Path, err)
		}
		r.jobs = append(r.jobs, job)
	}
	for {
		jobs, err := r.q.QueryBlockJobs(ctx)
		if err != nil {
			return err
		}
		ready, done, total := 0, int64(0), int64(0)
		for _, want := range r.jobs {
			found := false
			for _, j := range jobs {
				if j.Device == want {
					found = true
					done += j.Offset
					total += j.Len
					if j.Ready {
						ready++
					}
				}
			}
			if !found {
				return fmt.Errorf("the mirror of a disk ended before it was in step: %s", r.jobError(want))
			}
		}
		r.res.DiskBytes = done
		r.progress("disks", &Progress{DiskDone: done, DiskTotal: total})
		if ready == len(r.jobs) {
			return nil
		}
		if err := sleep(ctx, r.s.poll()); err != nil {
			return err
		}
	}
}

// jobError is why job ended, from its BLOCK_JOB_COMPLETED event.
func (r *run) jobError(job string) string {
	for _, ev := range r.q.Events() {
		if ev.Name != "BLOCK_JOB_COMPLETED" && ev.Name != "BLOCK_JOB_ERROR" {
			continue
		}
		var d struct {
			Device string `json:"device"`
			Error  string `json:"error"`
		}
		if json.Unmarshal(ev.Data, &d) == nil && d.Device == job && d.Error != "" {
			return d.Error
		}
	}
	return "QEMU gave no reason (the destination's NBD server went away?)"
}

// migrate sends memory and devices, ends the mirrors at switch-over (the
// guest stopped, so no write is lost) and waits for completion.
func (r *run) migrate(ctx context.Context, inc *Incoming) error {
	if err := r.q.SetMigrationCapabilities(ctx, map[string]bool{"return-path": true, "pause-before-switchover": true}); err != nil {
		return err
	}
	if _, err := r.q.Execute(ctx, "migrate-set-parameters", map[string]any{"tls-creds": tlsID}); err != nil {
		return err
	}
	r.migrated = true
	if err := r.q.Migrate(ctx, inc.MigrateURI); err != nil {
		return err
	}
	switched := false
	for {
		m, err := r.q.QueryMigrate(ctx)
		if err != nil {
			return err
		}
		p := &Progress{Status: m.Status, TotalTime: m.TotalTime, ExpectedDowntime: m.ExpectedDowntime, Downtime: m.Downtime, DiskDone: r.res.DiskBytes, DiskTotal: r.res.DiskBytes}
		if m.RAM != nil {
			p.RAMTransferred, p.RAMRemaining, p.RAMTotal = m.RAM.Transferred, m.RAM.Remaining, m.RAM.Total
			p.DirtyRate = m.RAM.DirtyPagesRate * m.RAM.PageSize
			p.MBps = m.RAM.MBps
			r.res.RAMBytes = m.RAM.Transferred
		}
		switch m.Status {
		case "pre-switchover":
			if !switched {
				r.progress("switchover", p)
				if err := r.dst.Ready(ctx, r.v.Name()); err != nil {
					return fmt.Errorf("the destination is not ready for the switch-over: %w", err)
				}
				if err := r.endMirrors(ctx, false); err != nil {
					return err
				}
				if _, err := r.q.Execute(ctx, "migrate-continue", map[string]any{"state": "pre-switchover"}); err != nil {
					return err
				}
				switched = true
			}
		case "completed":
			r.res.TotalTime, r.res.Downtime = m.TotalTime, m.Downtime
			r.progress("memory", p)
			return nil
		case "failed", "cancelled":
			desc := m.ErrorDesc
			if desc == "" {
				desc = m.Status
			}
			return errdefs.New(errdefs.ErrUnavailable, "QEMU's migration %s: %s", m.Status, desc)
		default:
			r.progress("memory", p)
		}
		if err := sleep(ctx, r.s.poll()); err != nil {
			return err
		}
	}
}

// endMirrors ends the mirror jobs: in step, their last writes flushed
// (force: at once, whatever they hold).
func (r *run) endMirrors(ctx context.Context, force bool) error {
	var errs []error
	for _, j := range r.jobs {
		if _, err := r.q.Execute(ctx, "block-job-cancel", map[string]any{"device": j, "force": force}); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			if qe := (*qmp.Error)(nil); !errors.As(err, &qe) || qe.Class != "DeviceNotActive" {
				errs = append(errs, err)
			}
		}
	}
	deadline := time.Now().Add(2 * time.Minute)
	for len(errs) == 0 {
		jobs, err := r.q.QueryBlockJobs(ctx)
		if err != nil {
			return err
		}
		left := 0
		for _, j := range jobs {
			for _, want := range r.jobs {
				if j.Device == want {
					left++
				}
			}
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d disk mirrors did not end", left)
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	if len(errs) == 0 {
		r.jobs = nil
	}
	return errors.Join(errs...)
}

// fail undoes what was set up, on both sides, and says which step failed.
func (r *run) fail(step Step, err error) error {
	e := &StepError{VM: r.v.Name(), Host: r.host, Step: step, Err: err}
	if r.q == nil {
		return e
	}
	// Undo even when the caller's context ended.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	if r.migrated {
		r.q.Execute(ctx, "migrate_cancel", nil)
		for {
			m, err := r.q.QueryMigrate(ctx)
			if err != nil || m.Finished() || m.Status == "none" || m.Status == "" {
				break
			}
			if sleep(ctx, 50*time.Millisecond) != nil {
				break
			}
		}
	}
	if len(r.jobs) > 0 {
		if err := r.endMirrors(ctx, true); err != nil {
			errs = append(errs, err)
		}
	}
	for _, n := range r.nodes {
		r.q.Execute(ctx, "blockdev-del", map[string]any{"node-name": n})
	}
	if r.creds {
		r.q.Execute(ctx, "object-del", map[string]any{"id": tlsID})
	}
	if r.wasRun {
		if st, err := r.q.Status(ctx); err == nil && st != "running" {
			if _, err := r.q.Execute(ctx, "cont", nil); err != nil {
				errs = append(errs, fmt.Errorf("resume the guest here: %w", err))
			}
		}
	}
	if r.prepared {
		if err := r.dst.Abort(ctx, r.v.Name()); err != nil {
			e.DestinationLeft = true
			errs = append(errs, fmt.Errorf("clean up %s: %w", r.host, err))
		}
	}
	e.CleanupErr = errors.Join(errs...)
	r.s.log().Warn("migration failed", "vm", r.v.Name(), "host", r.host, "step", step, "err", err, "cleanup", e.CleanupErr)
	r.progress("failed", nil)
	return e
}

func (r *run) progress(phase string, p *Progress) {
	if r.o.Progress == nil {
		return
	}
	if p == nil {
		p = &Progress{}
	}
	p.VM, p.Host, p.Phase = r.v.Name(), r.host, phase
	r.o.Progress(*p)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
