package keybroker

import (
	"path/filepath"
	"testing"
)

// TestPrepareGenerations: a TPM that has state but had no generation record
// gets one and is listed as reset; a new TPM, or one whose record existed
// before the start, is not.
func TestPrepareGenerations(t *testing.T) {
	tests := []struct {
		name      string
		withState bool // the TPM has sealed state
		hadRecord bool
		wantReset bool
	}{
		{"new TPM", false, false, false},
		{"state, record kept", true, true, false},
		{"state, record missing", true, false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHost(t)
			dir := filepath.Join(t.TempDir(), "tpm")
			o, err := h.OpenTPM(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer o.Close()
			if tc.withState {
				writeBlob(t, dir, o.Key.bytes(), []byte("state"))
			}
			reset, err := h.PrepareGenerations(o.TPM, dir, tc.hadRecord)
			if err != nil || reset != tc.wantReset {
				t.Fatalf("PrepareGenerations = %v, %v; want reset %v", reset, err, tc.wantReset)
			}
			if has, err := h.HasGenerations(o.TPM); err != nil || !has {
				t.Errorf("HasGenerations after PrepareGenerations = %v, %v; want a record", has, err)
			}
			resets, err := h.RollbackResets()
			if err != nil {
				t.Fatal(err)
			}
			listed := len(resets) == 1 && resets[0].TPM == o.TPM && resets[0].Dir != ""
			if listed != tc.wantReset || (!tc.wantReset && len(resets) != 0) {
				t.Errorf("RollbackResets = %+v; want the TPM listed: %v", resets, tc.wantReset)
			}
		})
	}
}
