package main

import (
	"fmt"
	"strings"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
)

// TestFormatMissingKeyError: a TPM this host cannot open is rendered with
// the guardians that could, and the ways out as command lines.
func TestFormatMissingKeyError(t *testing.T) {
	err := fmt.Errorf("start: %w", &keybroker.MissingKeyError{
		Dir:  "/vms/web/tpm",
		TPM:  uuid.MustParse("6c3c7a2e-5b1f-4a8e-9d0c-1f2e3d4c5b6a"),
		Rows: []guardian.Row{{Name: "host:a", Fingerprint: "aa11"}},
	})
	got := formatError(err)
	for _, want := range []string{
		"cannot be opened on this host", "Its key protector admits:\n  - host:a (fingerprint aa11)\nThis host holds:\nWays out:\n  fix: ",
		"`vtpm guardian export host:a -o G.p12` (where it lives)",
		"then import it here: `vtpm guardian import G.p12`",
		"`vtpm guardian export --certs-only -o host.pem`",
		"`vtpm protector grant TPM host.pem` (on a host that can open the TPM)",
		"`vtpm key import FILE`",
		"`vtpm tpm policy /vms/web/tpm --on-missing-key reprovision`",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("rendered error lacks %q", want)
		}
	}
	if strings.Contains(got, "--replace") {
		t.Error("offers replacing an imported key the host does not hold")
	}
}
