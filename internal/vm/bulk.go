package vm

import (
	"fmt"
	"strings"
)

// BulkResult is one VM's outcome in a change made to many VMs.
type BulkResult struct {
	VM string `json:"vm"`
	OK bool   `json:"ok"`
	// Skipped: the change does not apply to the VM (a VM without a TPM in
	// a change to all VMs' TPMs); neither done nor failed.
	Skipped bool   `json:"skipped,omitempty"`
	Error   string `json:"error,omitempty"`
	Note    string `json:"note,omitempty"`
	Err     error  `json:"-"` // the failure as returned, for its kind and remedies
}

// Line is r as one line of a bulk command's report; explain renders a
// failure (with its remedies), and a longer explanation is joined onto the
// line.
func (r BulkResult) Line(explain func(error) string) string {
	switch {
	case r.Skipped:
		return fmt.Sprintf("%s: skipped (%s)", r.VM, r.Note)
	case !r.OK:
		return fmt.Sprintf("%s: failed: %s", r.VM, strings.Join(strings.Fields(explain(r.Err)), " "))
	case r.Note != "":
		return fmt.Sprintf("%s: ok (%s)", r.VM, r.Note)
	}
	return r.VM + ": ok"
}

// BulkResults are the outcomes of a change made to many VMs, in order.
type BulkResults []BulkResult

// Explain sets each failure's Error to explain's rendering of it (with its
// remedies, for a report that carries no error values).
func (rs BulkResults) Explain(explain func(error) string) {
	for i, r := range rs {
		if r.Err != nil {
			rs[i].Error = explain(r.Err)
		}
	}
}

// Summary counts rs' outcomes.
func (rs BulkResults) Summary() BulkSummary {
	var s BulkSummary
	for _, r := range rs {
		switch {
		case r.Skipped:
			s.Skipped++
		case r.OK:
			s.OK++
		default:
			s.Failed++
		}
	}
	return s
}

// BulkSummary counts the outcomes of a change made to many VMs.
type BulkSummary struct{ OK, Skipped, Failed int }

// Err is the failure of the whole change, what, when any VM failed: one
// line that counts them (each failure has its own line).
func (s BulkSummary) Err(what string) error {
	if s.Failed == 0 {
		return nil
	}
	return fmt.Errorf("%s: %d of %d VMs failed", what, s.Failed, s.OK+s.Skipped+s.Failed)
}

// String is the summary line: skipped VMs are mentioned only when there are
// some.
func (s BulkSummary) String() string {
	if s.Skipped > 0 {
		return fmt.Sprintf("%d ok, %d skipped, %d failed", s.OK, s.Skipped, s.Failed)
	}
	return fmt.Sprintf("%d ok, %d failed", s.OK, s.Failed)
}

// Targets returns refs or, with all, the name of every registered VM that
// is not a template (templates never have a TPM to switch).
func (h *Registry) Targets(refs []string, all bool) ([]string, error) {
	if !all {
		return refs, nil
	}
	entries, err := h.Entries()
	if err != nil {
		return nil, err
	}
	refs = nil
	for _, e := range entries {
		if v, err := h.Open(e.UUID.String()); err == nil && v.Config.Template {
			continue
		}
		refs = append(refs, e.Name)
	}
	return refs, nil
}

// SetTPMsEnabled attaches (on) or detaches the TPM of every VM in refs,
// trying each even when some fail, and returns their results in order.
// all says refs are every VM (Targets with all): a VM without a TPM is
// then skipped, where a VM named on its own fails. done, when not nil, is
// called with each result as it is known.
func (h *Registry) SetTPMsEnabled(refs []string, on, all bool, done func(BulkResult)) (results BulkResults, failed int) {
	return h.setTPMsEnabled(refs, on, all, done)
}

func (h *Registry) setTPMsEnabled(refs []string, on, skipNoTPM bool, done func(BulkResult)) (results BulkResults, failed int) {
	results = make(BulkResults, 0, len(refs))
	for _, ref := range refs {
		r := BulkResult{VM: ref}
		v, err := h.Open(ref)
		if err == nil && skipNoTPM && !v.Config.HasTPM() {
			r.Skipped, r.Note = true, "no TPM"
			results = append(results, r)
			if done != nil {
				done(r)
			}
			continue
		}
		if err == nil {
			r.Note, err = h.SetTPMEnabled(v, on)
		}
		if err != nil {
			r.Error, r.Err = err.Error(), err
			failed++
		} else {
			r.OK = true
		}
		results = append(results, r)
		if done != nil {
			done(r)
		}
	}
	return results, failed
}
