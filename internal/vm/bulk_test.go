package vm

import (
	"errors"
	"slices"
	"testing"
)

// TestBulkReport: each result's line, the errors a JSON report carries and
// the summary line.
func TestBulkReport(t *testing.T) {
	explain := func(err error) string { return err.Error() + "\n  fix: something" }
	rs := BulkResults{
		{VM: "a", OK: true},
		{VM: "b", OK: true, Note: "already disabled"},
		{VM: "c", Skipped: true, Note: "no TPM"},
		{VM: "d", Err: errors.New("VM d has no TPM"), Error: "VM d has no TPM"},
	}
	want := []string{"a: ok", "b: ok (already disabled)", "c: skipped (no TPM)", "d: failed: VM d has no TPM fix: something"}
	for i, r := range rs {
		if got := r.Line(explain); got != want[i] {
			t.Errorf("line %d = %q, want %q", i, got, want[i])
		}
	}
	if got, want := rs.Summary(), (BulkSummary{OK: 2, Skipped: 1, Failed: 1}); got != want {
		t.Errorf("Summary() = %+v, want %+v", got, want)
	}
	if err := rs.Summary().Err("tpm disable"); err == nil || err.Error() != "tpm disable: 1 of 4 VMs failed" {
		t.Errorf("Summary().Err = %v, want tpm disable: 1 of 4 VMs failed", err)
	}
	if err := (BulkSummary{OK: 1, Skipped: 1}).Err("tpm enable"); err != nil {
		t.Errorf("Err without failures = %v, want nil", err)
	}
	rs.Explain(explain)
	if rs[3].Error != "VM d has no TPM\n  fix: something" || rs[0].Error != "" {
		t.Errorf("Explain: errors %q, %q; want the failure's explained, none for the rest", rs[3].Error, rs[0].Error)
	}
	tests := []struct {
		s    BulkSummary
		want string
	}{
		{BulkSummary{OK: 2, Failed: 1}, "2 ok, 1 failed"},
		{BulkSummary{OK: 2, Skipped: 1, Failed: 0}, "2 ok, 1 skipped, 0 failed"},
		{BulkSummary{}, "0 ok, 0 failed"},
	}
	for _, tt := range tests {
		if got := tt.s.String(); got != tt.want {
			t.Errorf("%+v.String() = %q, want %q", tt.s, got, tt.want)
		}
	}
}

func TestSetTPMsEnabled(t *testing.T) {
	h := testHost(t)
	for _, o := range []CreateOptions{
		{Name: "with-tpm", OS: Linux, TPM: yes(), NoDisk: true},
		{Name: "without-tpm", OS: Linux, NoDisk: true},
	} {
		if _, err := h.Create(o); err != nil {
			t.Fatal(err)
		}
	}
	src, err := h.Open("with-tpm")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Template(src, "tmpl", ""); err != nil {
		t.Fatal(err)
	}
	refs, err := h.Targets(nil, true)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(refs)
	if want := []string{"with-tpm", "without-tpm"}; !slices.Equal(refs, want) {
		t.Fatalf("Targets(all) = %v, want %v (no templates)", refs, want)
	}
	if got, _ := h.Targets([]string{"x"}, false); !slices.Equal(got, []string{"x"}) {
		t.Errorf("Targets(x) = %v, want the names given", got)
	}

	tests := []struct {
		on     bool
		refs   []string
		want   []BulkResult // Err left out
		failed int
	}{
		{false, []string{"without-tpm", "nope", "with-tpm"}, []BulkResult{
			{VM: "without-tpm", Error: "VM without-tpm has no TPM to disable"},
			{VM: "nope"},
			{VM: "with-tpm", OK: true},
		}, 2},
		{false, []string{"with-tpm"}, []BulkResult{{VM: "with-tpm", OK: true, Note: "already disabled"}}, 0},
		{true, []string{"with-tpm"}, []BulkResult{{VM: "with-tpm", OK: true}}, 0},
	}
	for _, tc := range tests {
		var seen []string
		got, failed := h.SetTPMsEnabled(tc.refs, tc.on, false, func(r BulkResult) { seen = append(seen, r.VM) })
		if failed != tc.failed || len(got) != len(tc.want) || !slices.Equal(seen, tc.refs) {
			t.Fatalf("SetTPMsEnabled(%v, %v): %+v, %d failed, reported %v; want %d results, %d failed, each reported in order",
				tc.refs, tc.on, got, failed, seen, len(tc.want), tc.failed)
		}
		for i, r := range got {
			w := tc.want[i]
			if r.VM != w.VM || r.OK != w.OK || r.Note != w.Note || (w.Error != "" && r.Error != w.Error) || r.OK != (r.Err == nil) || (r.Err != nil) != (r.Error != "") {
				t.Errorf("result %d: %+v, want %+v", i, r, w)
			}
		}
		v, _ := h.Open("with-tpm")
		if v.Config.TPMEnabled() != tc.on {
			t.Errorf("with-tpm's TPM enabled %v, want %v", v.Config.TPMEnabled(), tc.on)
		}
	}
}

// TestSetAllTPMsSkipsVMsWithoutTPM: a change to every VM's TPM does not
// apply to a VM without one; it is skipped, not failed.
func TestSetAllTPMsSkipsVMsWithoutTPM(t *testing.T) {
	h := testHost(t)
	for _, o := range []CreateOptions{
		{Name: "with-tpm", OS: Linux, TPM: yes(), NoDisk: true},
		{Name: "without-tpm", OS: Linux, NoDisk: true},
	} {
		if _, err := h.Create(o); err != nil {
			t.Fatal(err)
		}
	}
	refs, err := h.Targets(nil, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, on := range []bool{false, true} {
		got, failed := h.SetTPMsEnabled(refs, on, true, nil)
		if failed != 0 || len(got) != 2 {
			t.Fatalf("SetTPMsEnabled(all, %v): %+v, %d failed; want 2 results, none failed", on, got, failed)
		}
		for _, r := range got {
			if want := r.VM == "without-tpm"; r.Skipped != want || r.OK == want || r.Err != nil {
				t.Errorf("SetTPMsEnabled(all, %v): %+v; want without-tpm skipped and with-tpm ok", on, r)
			}
		}
	}
}
