package stateimport

import (
	"strings"
	"testing"

	"github.com/google/uuid"
)

func TestResultWriteText(t *testing.T) {
	id := uuid.MustParse("9c6a2f0e-5a43-4a1e-8f0e-0d7e4e3e6a11")
	tests := []struct {
		r    Result
		want string
	}{
		{Result{Source: "src", Dest: "dst", UUID: id, States: []string{"permall"}},
			"Imported permall from src into vtpm sealed state in dst (TPM " + id.String() + ").\n"},
		{Result{Source: "d", Dest: "d", UUID: id, States: []string{"permall", "volatilestate"}, Backup: "d/swtpm-backup-1"},
			"Imported permall, volatilestate from d into vtpm sealed state in d (TPM " + id.String() + ").\nThe swtpm files are kept in d/swtpm-backup-1.\n"},
	}
	for _, tt := range tests {
		var b strings.Builder
		tt.r.WriteText(&b)
		if b.String() != tt.want {
			t.Errorf("WriteText = %q, want %q", b.String(), tt.want)
		}
	}
}
