package vm

import (
	"errors"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
)

func TestOutgoingRules(t *testing.T) {
	h := testHost(t)
	mk := func(o CreateOptions) *VM {
		t.Helper()
		o.NoDisk = true
		res, err := h.Create(o)
		if err != nil {
			t.Fatal(err)
		}
		return res.VM
	}
	win := mk(CreateOptions{Name: "win", OS: Windows11})
	plain := mk(CreateOptions{Name: "plain", OS: Linux})
	pass := mk(CreateOptions{Name: "pass", OS: Other, Passthrough: []string{"/dev/null"}})
	tmpl, err := h.Template(win, "gold", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		v    *VM
		op   Op
		new  string
		mode TPMMode
		want TPMMode // what the destination does, when accepted
		kind error   // the refusal's kind, else
		rule string
	}{
		{name: "move keeps the TPM", v: win, op: OpMove, want: TPMKeep},
		{name: "move without a TPM", v: plain, op: OpMove, want: TPMNone},
		{name: "move renames", v: win, op: OpMove, new: "other", kind: errdefs.ErrInvalidArgument},
		{name: "copy, new TPM", v: win, op: OpCopy, mode: TPMNew, want: TPMNew},
		{name: "copy, copied TPM", v: win, op: OpCopy, mode: TPMCopy, want: TPMCopy},
		{name: "copy of Windows 11 without a TPM", v: win, op: OpCopy, mode: TPMNone, rule: "windows11-needs-tpm"},
		{name: "copy a TPM that is not there", v: plain, op: OpCopy, mode: TPMCopy, kind: errdefs.ErrFailedPrecondition},
		{name: "copy a template", v: tmpl.VM, op: OpCopy, want: TPMNone},
		{name: "deploy a template", v: tmpl.VM, op: OpDeploy, new: "desk", want: TPMNew},
		{name: "deploy a VM", v: win, op: OpDeploy, new: "desk", kind: errdefs.ErrFailedPrecondition},
		{name: "passthrough disk", v: pass, op: OpMove, kind: errdefs.ErrFailedPrecondition},
		{name: "bad name", v: win, op: OpCopy, new: "../x", kind: errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := h.Outgoing(tc.v, tc.op, tc.new, tc.mode)
			switch {
			case tc.rule != "":
				if !IsRule(err, tc.rule) {
					t.Fatalf("%v; want a refusal by rule %s", err, tc.rule)
				}
			case tc.kind != nil:
				if !errors.Is(err, tc.kind) {
					t.Fatalf("%v; want %v", err, tc.kind)
				}
			case err != nil:
				t.Fatal(err)
			case out.TPM != tc.want:
				t.Errorf("TPM %s, want %s", out.TPM, tc.want)
			case tc.op != OpMove && out.Config.UUID == tc.v.Config.UUID:
				t.Error("a copy keeps the UUID")
			case tc.op == OpMove && out.Config.UUID != tc.v.Config.UUID:
				t.Error("a move changes the UUID")
			}
			if err == nil {
				tpmFiles := 0
				for _, f := range out.Files {
					if strings.HasPrefix(f.Rel, TPMDir+"/") {
						tpmFiles++
					}
				}
				if (tpmFiles > 0) != out.TPMTravels() {
					t.Errorf("%d files of tpm/ are sent, the TPM travels: %v", tpmFiles, out.TPMTravels())
				}
			}
		})
	}
}
