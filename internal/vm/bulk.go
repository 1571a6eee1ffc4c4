package vm

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
func (h *Registry) SetTPMsEnabled(refs []string, on, all bool, done func(BulkResult)) (results []BulkResult, failed int) {
	return h.setTPMsEnabled(refs, on, all, done)
}

func (h *Registry) setTPMsEnabled(refs []string, on, skipNoTPM bool, done func(BulkResult)) (results []BulkResult, failed int) {
	results = make([]BulkResult, 0, len(refs))
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
