package vm

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
)

// hasRemedy reports whether err offers action with the given args.
func hasRemedy(err error, action errdefs.Action, args ...string) bool {
	want := errdefs.Do(action, args...)
	return slices.ContainsFunc(errdefs.Remedies(err), func(r errdefs.Remedy) bool {
		if r.Action != want.Action {
			return false
		}
		for k, v := range want.Args {
			if r.Args[k] != v {
				return false
			}
		}
		return true
	})
}

// TestErrorsAsData checks that refusals carry their kind and their ways out
// as data, and that no message names a command line.
func TestErrorsAsData(t *testing.T) {
	h := testHost(t)
	plain, err := h.Create(CreateOptions{Name: "plain", OS: Linux, NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	tmpl, err := h.Template(plain.VM, "tmpl", "")
	if err != nil {
		t.Fatal(err)
	}
	bios := &Config{Name: "bios", OS: Linux, Firmware: BIOS}
	_, notFound := h.Find("nope")
	_, clonedTmpl := h.Clone(tmpl.VM, "c1", TPMNew, "")
	_, deployPlain := h.Deploy(plain.VM, "d1", "")
	_, enableNone := h.SetTPMEnabled(plain.VM, true)
	_, unregister := h.Unregister("nope")
	preflight := &PreflightError{VM: "x", Problems: []error{
		errdefs.New(errdefs.ErrNotFound, "a").With(errdefs.Do(errdefs.ActionDoctor)),
		errdefs.New(errdefs.ErrDataLoss, "b").With(errdefs.Do(errdefs.ActionDoctor), errdefs.Do(errdefs.ActionVMStop, "vm", "x")),
	}}
	tests := []struct {
		name   string
		err    error
		kind   error
		is     error // a sentinel of this package it must also match
		action errdefs.Action
		args   []string
	}{
		{"find", notFound, errdefs.ErrNotFound, ErrNotFound, errdefs.ActionVMList, nil},
		{"unregister", unregister, errdefs.ErrNotFound, ErrNotFound, errdefs.ActionVMRegister, nil},
		{"clone a template", clonedTmpl, errdefs.ErrFailedPrecondition, nil, errdefs.ActionVMDeploy, []string{"template", "tmpl", "new", "c1"}},
		{"deploy a VM", deployPlain, errdefs.ErrFailedPrecondition, nil, errdefs.ActionVMTemplate, []string{"vm", "plain"}},
		{"enable a TPM it has not", enableNone, errdefs.ErrNotFound, nil, errdefs.ActionTPMAdd, []string{"vm", "plain"}},
		{"TPM on BIOS", CanHaveTPM(bios), errdefs.ErrFailedPrecondition, nil, errdefs.ActionVMCreate, []string{"os", "linux"}},
		{"preflight", fmt.Errorf("start: %w", preflight), errdefs.ErrFailedPrecondition, nil, errdefs.ActionVMStop, []string{"vm", "x"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.err == nil {
				t.Fatal("no error")
			}
			if !errors.Is(tt.err, tt.kind) {
				t.Errorf("%v: kind %v, want %v", tt.err, errdefs.KindOf(tt.err), tt.kind)
			}
			if tt.is != nil && !errors.Is(tt.err, tt.is) {
				t.Errorf("%v does not match %v", tt.err, tt.is)
			}
			if !hasRemedy(tt.err, tt.action, tt.args...) {
				t.Errorf("%v: remedies %+v lack %s %q", tt.err, errdefs.Remedies(tt.err), tt.action, tt.args)
			}
			if strings.Contains(tt.err.Error(), "vtpm ") {
				t.Errorf("message names a command: %v", tt.err)
			}
		})
	}
	if n := len(preflight.Remedies()); n != 2 {
		t.Errorf("preflight remedies %+v, want the union of its problems' (2)", preflight.Remedies())
	}
}
