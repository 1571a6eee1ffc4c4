// Package fleet runs one operation on many hosts at once and reports every
// host's outcome: a host that does not answer in time is reported as
// unreachable, the others' results stand, and the whole fails when any
// host or VM failed.
package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/vm"
)

// DefaultTimeout bounds one host's part of a fleet-wide operation.
const DefaultTimeout = 30 * time.Second

// Outcome is one host's answer: its value, or why there is none.
type Outcome[T any] struct {
	Host  string
	Value T
	Err   error
}

// Run calls do for every host concurrently, each under its own timeout (0:
// DefaultTimeout), and returns the outcomes in the hosts' order.
func Run[T any](ctx context.Context, hosts []string, timeout time.Duration, do func(ctx context.Context, host string) (T, error)) []Outcome[T] {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	out := make([]Outcome[T], len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			v, err := do(hctx, h)
			if err != nil && hctx.Err() != nil && ctx.Err() == nil {
				err = &UnreachableError{Host: h, Err: fmt.Errorf("no answer within %v: %w", timeout, err)}
			}
			out[i] = Outcome[T]{Host: h, Value: v, Err: err}
		}()
	}
	wg.Wait()
	return out
}

// UnreachableError is a host that did not answer.
type UnreachableError struct {
	Host string
	Err  error
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("host %s is unreachable: %v", e.Host, e.Err)
}
func (e *UnreachableError) Unwrap() error { return e.Err }

// Is makes an UnreachableError unavailable.
func (e *UnreachableError) Is(target error) bool { return target == errdefs.ErrUnavailable }

// Unreachable reports whether err says a host did not answer, as opposed
// to answering with a failure.
func Unreachable(err error) bool {
	return errors.Is(err, errdefs.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded)
}

// Hosts resolves a --hosts value: "all" is self and every peer; otherwise
// a comma-separated list of names, each self or a peer, without repeats.
func Hosts(spec, self string, peers []string) ([]string, error) {
	if strings.TrimSpace(spec) == "all" {
		return append([]string{self}, peers...), nil
	}
	var out []string
	for _, n := range strings.Split(spec, ",") {
		n = strings.TrimSpace(n)
		if n == "" || slices.Contains(out, n) {
			continue
		}
		if n != self && !slices.Contains(peers, n) {
			return nil, errdefs.New(errdefs.ErrNotFound, "--hosts: %s is neither this host (%s) nor a trusted peer (%s)", n, self, strings.Join(peers, ", ")).
				With(errdefs.Advise("trust it first, or give `all`"))
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "--hosts: give all, or host names separated by commas")
	}
	return out, nil
}

// Summary counts a fleet-wide operation's outcomes.
type Summary struct {
	Hosts       int `json:"hosts"`
	Unreachable int `json:"unreachable"`
	// HostsFailed counts hosts that answered with a failure of the whole.
	HostsFailed int `json:"hosts_failed"`
	VMs         int `json:"vms"`
	OK          int `json:"ok"`
	Skipped     int `json:"skipped"`
	Failed      int `json:"failed"`
}

// Err is the failure of the whole, what, when a host or a VM failed.
func (s Summary) Err(what string) error {
	if s.Unreachable+s.HostsFailed+s.Failed == 0 {
		return nil
	}
	return &Error{What: what, Summary: s}
}

// String is the summary line.
func (s Summary) String() string {
	line := fmt.Sprintf("%d hosts, %d VMs", s.Hosts, s.VMs)
	if s.OK+s.Skipped+s.Failed > 0 {
		line += fmt.Sprintf(": %d ok, %d skipped, %d failed", s.OK, s.Skipped, s.Failed)
	}
	if s.Unreachable > 0 {
		line += fmt.Sprintf("; %d unreachable", s.Unreachable)
	}
	if s.HostsFailed > 0 {
		line += fmt.Sprintf("; %d failed", s.HostsFailed)
	}
	return line
}

// Error is a fleet-wide operation that did not succeed everywhere; each
// failure has its own line in the report.
type Error struct {
	What    string
	Summary Summary
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %d of %d hosts unreachable, %d failed; %d of %d VMs failed",
		e.What, e.Summary.Unreachable, e.Summary.Hosts, e.Summary.HostsFailed, e.Summary.Failed, e.Summary.VMs)
}

// Is makes an Error unavailable when only hosts were missing, else a
// failed precondition.
func (e *Error) Is(target error) bool {
	if e.Summary.Failed+e.Summary.HostsFailed == 0 {
		return target == errdefs.ErrUnavailable
	}
	return target == errdefs.ErrFailedPrecondition
}

// HostChange is one host's part of a change made to many VMs.
type HostChange struct {
	Host      string         `json:"host"`
	Reachable bool           `json:"reachable"`
	Error     string         `json:"error,omitempty"`
	Err       error          `json:"-"`
	VMs       vm.BulkResults `json:"vms"`
}

// ChangeReport is a change made to VMs on many hosts.
type ChangeReport struct {
	Hosts   []HostChange `json:"hosts"`
	Summary Summary      `json:"summary"`
}

// Changes collects outcomes of a change into a report; explain renders a
// failure with its remedies.
func Changes(outs []Outcome[vm.BulkResults], explain func(error) string) *ChangeReport {
	r := &ChangeReport{Hosts: []HostChange{}}
	r.Summary.Hosts = len(outs)
	for _, o := range outs {
		hc := HostChange{Host: o.Host, Reachable: o.Err == nil || !Unreachable(o.Err), VMs: o.Value}
		if hc.VMs == nil {
			hc.VMs = vm.BulkResults{}
		}
		if o.Err != nil {
			hc.Err, hc.Error = o.Err, explain(o.Err)
			if hc.Reachable {
				r.Summary.HostsFailed++
			} else {
				r.Summary.Unreachable++
			}
		}
		hc.VMs.Explain(explain)
		s := hc.VMs.Summary()
		r.Summary.VMs += len(hc.VMs)
		r.Summary.OK, r.Summary.Skipped, r.Summary.Failed = r.Summary.OK+s.OK, r.Summary.Skipped+s.Skipped, r.Summary.Failed+s.Failed
		r.Hosts = append(r.Hosts, hc)
	}
	return r
}

// WriteText writes one line per VM per host, a line per host that failed
// as a whole, and the summary.
func (r *ChangeReport) WriteText(w io.Writer, explain func(error) string) {
	for _, h := range r.Hosts {
		if h.Err != nil {
			fmt.Fprintf(w, "%s: %s: %s\n", h.Host, hostState(h.Reachable), oneLine(h.Error))
		}
		for _, v := range h.VMs {
			fmt.Fprintf(w, "%s: %s\n", h.Host, v.Line(explain))
		}
	}
	fmt.Fprintln(w, r.Summary)
}

func hostState(reachable bool) string {
	if reachable {
		return "failed"
	}
	return "unreachable"
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// VM is one VM in a fleet-wide list.
type VM struct {
	Name  string `json:"name"`
	UUID  string `json:"uuid"`
	State string `json:"state"` // running or stopped
	TPM   string `json:"tpm"`   // enabled, disabled or none
}

// ListColumns head the columns of a fleet-wide list.
var ListColumns = []string{"HOST", "NAME", "UUID", "STATE", "TPM"}

// HostList is one host's VMs.
type HostList struct {
	Host      string `json:"host"`
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"`
	Err       error  `json:"-"`
	VMs       []VM   `json:"vms"`
}

// ListReport is the VMs of many hosts.
type ListReport struct {
	Hosts   []HostList `json:"hosts"`
	Summary Summary    `json:"summary"`
}

// Lists collects outcomes of a listing into a report.
func Lists(outs []Outcome[[]VM], explain func(error) string) *ListReport {
	r := &ListReport{Hosts: []HostList{}}
	r.Summary.Hosts = len(outs)
	for _, o := range outs {
		hl := HostList{Host: o.Host, Reachable: o.Err == nil || !Unreachable(o.Err), VMs: o.Value}
		if hl.VMs == nil {
			hl.VMs = []VM{}
		}
		if o.Err != nil {
			hl.Err, hl.Error = o.Err, explain(o.Err)
			if hl.Reachable {
				r.Summary.HostsFailed++
			} else {
				r.Summary.Unreachable++
			}
		}
		r.Summary.VMs += len(hl.VMs)
		r.Hosts = append(r.Hosts, hl)
	}
	return r
}

// WriteText writes a table with one row per VM per host, a row per host
// that did not answer, and the summary.
func (r *ListReport) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(ListColumns, "\t"))
	for _, h := range r.Hosts {
		if h.Err != nil {
			fmt.Fprintf(tw, "%s\t(%s: %s)\n", h.Host, hostState(h.Reachable), oneLine(h.Error))
		}
		for _, v := range h.VMs {
			fmt.Fprintln(tw, strings.Join([]string{h.Host, v.Name, v.UUID, v.State, v.TPM}, "\t"))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintln(w, r.Summary)
	return err
}
