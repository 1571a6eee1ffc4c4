package hostcheck

import (
	"context"
	"os"
	"os/exec"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/testutil"
)

func TestQEMUUser(t *testing.T) {
	if os.Geteuid() != 0 {
		name, uid, _, err := QEMUUser("")
		if err != nil || name != "" || uid != os.Geteuid() {
			t.Errorf("QEMUUser as uid %d = %q, %d, %v; want QEMU to run as the caller", os.Geteuid(), name, uid, err)
		}
		return
	}
	for _, tc := range []struct {
		configured string
		kind       error // nil: a user other than root
	}{
		{"", nil},
		{"nobody", nil},
		{"root", errdefs.ErrFailedPrecondition},
		{"0", errdefs.ErrFailedPrecondition},
		{"no-such-qemu-user", errdefs.ErrFailedPrecondition},
	} {
		name, uid, _, err := QEMUUser(tc.configured)
		if tc.kind != nil {
			if errdefs.KindOf(err) != tc.kind {
				t.Errorf("QEMUUser(%q) = %q, %d, %v; want a refusal of kind %v", tc.configured, name, uid, err, tc.kind)
			}
			continue
		}
		if err != nil || name == "" || uid == 0 {
			t.Errorf("QEMUUser(%q) = %q, %d, %v; want an unprivileged user", tc.configured, name, uid, err)
		}
	}
}

func TestQEMUConfinementCheck(t *testing.T) {
	if _, err := exec.LookPath(QEMU); err != nil {
		testutil.Missing(t, "%s is not installed", QEMU)
	}
	if c := QEMUConfinementCheck(context.Background()); c.Status != OK {
		t.Errorf("QEMU confinement: %+v", c)
	}
}
