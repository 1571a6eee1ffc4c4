package errdefs

import (
	"errors"
	"fmt"
	"io/fs"
	"testing"
)

func TestKindAndRemediesThroughTheChain(t *testing.T) {
	stop := Do(ActionVMStop, "vm", "a")
	inner := New(ErrFailedPrecondition, "VM a is running").With(stop)
	outer := Wrap(ErrConflict, fmt.Errorf("step: %w", inner), "delete a").With(Advise("try later"), stop)
	tests := []struct {
		name     string
		err      error
		kind     error
		remedies int
	}{
		{"inner", inner, ErrFailedPrecondition, 1},
		{"wrapped by fmt", fmt.Errorf("x: %w", inner), ErrFailedPrecondition, 1},
		{"outer kind first, remedies merged without repeats", outer, ErrFailedPrecondition, 2},
		{"joined", errors.Join(errors.New("a"), inner), ErrFailedPrecondition, 1},
		{"no kind", fs.ErrNotExist, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if k := KindOf(tt.err); k != tt.kind {
				t.Errorf("KindOf = %v, want %v", k, tt.kind)
			}
			if n := len(Remedies(tt.err)); n != tt.remedies {
				t.Errorf("%d remedies, want %d: %+v", n, tt.remedies, Remedies(tt.err))
			}
		})
	}
	if !errors.Is(outer, ErrConflict) || !errors.Is(outer, ErrFailedPrecondition) {
		t.Error("outer matches neither its own kind nor its cause's")
	}
	if got, want := outer.Error(), "delete a: step: VM a is running"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}
