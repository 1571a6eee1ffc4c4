package sandbox

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
)

func TestMissingErrorIsData(t *testing.T) {
	err := fmt.Errorf("start: %w", &MissingError{Missing: []string{"Landlock (kernel too old)", "seccomp"}})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("kind %v, want failed precondition", errdefs.KindOf(err))
	}
	if strings.Contains(err.Error(), "vtpm ") || !strings.Contains(err.Error(), "Landlock (kernel too old); seccomp") {
		t.Errorf("message %q", err)
	}
	var actions []errdefs.Action
	for _, r := range errdefs.Remedies(err) {
		actions = append(actions, r.Action)
	}
	if len(actions) != 2 || actions[0] != errdefs.ActionDoctor || actions[1] != errdefs.ActionIsolationPreferred {
		t.Errorf("remedies %v, want doctor and isolation preferred", actions)
	}
}
