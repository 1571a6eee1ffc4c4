package attest_test

import (
	"errors"
	"strings"
	"testing"

	"vtpm/internal/attest"
	"vtpm/internal/errdefs"
)

func TestParsePolicy(t *testing.T) {
	d := strings.Repeat("ab", 32)
	full := func(override string) string {
		var pcrs []string
		for i := range 8 {
			v := `"` + d + `"`
			if i == 7 && override != "" {
				v = override
			}
			pcrs = append(pcrs, `"`+string(rune('0'+i))+`":`+v)
		}
		return `{` + strings.Join(pcrs, ",") + `}`
	}
	for _, tc := range []struct {
		name, json, err string
	}{
		{"good", `{"name":"fleet","secure_boot":true,"classes":{"x86":[` + full("") + `]}}`, ""},
		{"no name", `{"classes":{}}`, "no name"},
		{"short digest", `{"name":"fleet","classes":{"x86":[` + full(`"abcd"`) + `]}}`, "PCR 7 is not a SHA-256 digest"},
		{"not hex", `{"name":"fleet","classes":{"x86":[` + full(`"zz"`) + `]}}`, "parse attestation policy"},
		{"PCR 8", `{"name":"fleet","classes":{"x86":[{"0":"` + d + `","1":"` + d + `","2":"` + d + `","3":"` + d + `","4":"` + d + `","5":"` + d + `","6":"` + d + `","7":"` + d + `","8":"` + d + `"}]}}`, "only PCRs 0-7"},
		{"PCR missing", `{"name":"fleet","classes":{"x86":[{"0":"` + d + `"}]}}`, "PCR 1 is not"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := attest.ParsePolicy([]byte(tc.json))
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				if p.Name != "fleet" || !p.SecureBoot || len(p.Classes["x86"]) != 1 {
					t.Fatalf("parsed %s", p)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("got %v, want an invalid argument with %q", err, tc.err)
			}
		})
	}
}
