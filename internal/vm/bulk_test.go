package vm

import (
	"slices"
	"testing"
)

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
