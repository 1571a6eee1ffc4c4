package migrate

import (
	"crypto/rand"
	"strings"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/hostsvc"
)

// TestPreflightErrorKeyService: a refusal for a protector that also
// admits a guardian that is no host's (a key service's fleet guardian)
// offers, beside the grant, to register and attest the destination with
// the key service, naming that guardian; one that admits only hosts does
// not.
func TestPreflightErrorKeyService(t *testing.T) {
	newG := func(name string) *guardian.Guardian {
		g, err := guardian.New(name, guardian.MLKEM768X25519)
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	owner, fleet := newG("host:a"), newG("fleet")
	dek := make([]byte, 32)
	rand.Read(dek)
	refusal := errdefs.New(errdefs.ErrPermissionDenied, "no guardian here opens the TPM")
	for _, tc := range []struct {
		name   string
		others []*guardian.Guardian
		fleet  bool
	}{
		{"hosts only", []*guardian.Guardian{newG("host:c")}, false},
		{"fleet row", []*guardian.Guardian{fleet}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := guardian.NewProtector(uuid.New(), dek, owner, tc.others...)
			if err != nil {
				t.Fatal(err)
			}
			raw := p.Marshal()
			e := &PreflightError{VM: "v", Host: "b", Guardian: "host:b (fingerprint x)", Fleet: fleetRows(t.TempDir(), raw), Refusal: refusal}
			var add *errdefs.Remedy
			rs := e.Remedies()
			for i, r := range rs {
				if r.Action == errdefs.ActionKeyServiceHostAdd {
					add = &rs[i]
				}
			}
			if rs[0].Action != errdefs.ActionVMMigrateGrant {
				t.Errorf("first remedy %+v, want the grant", rs[0])
			}
			if !tc.fleet {
				if add != nil || len(e.Fleet) != 0 {
					t.Errorf("a protector of hosts only offers the key service: %v, %+v", e.Fleet, add)
				}
				return
			}
			if add == nil {
				t.Fatalf("no key service remedy in %+v", rs)
			}
			if add.Args["host"] != "b" || !strings.Contains(add.Note, fleet.Fingerprint()) || !strings.Contains(add.Note, "attest") {
				t.Errorf("key service remedy %+v: want host b, the fleet guardian's fingerprint, attestation", *add)
			}
			if msg := e.Error(); !strings.Contains(msg, "fleet (fingerprint "+fleet.Fingerprint()) {
				t.Errorf("message does not name the fleet row:\n%s", msg)
			}
		})
	}

	// A host whose service knows the fleet guardian names its row alone,
	// whatever the guardians are named.
	odd := newG("host:odd")
	p, err := guardian.NewProtector(uuid.New(), dek, owner, newG("backup"), odd)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	certs, err := odd.ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	if err := hostsvc.WriteFleet(root, certs); err != nil {
		t.Fatal(err)
	}
	if got, want := fleetRows(root, p.Marshal()), "host:odd (fingerprint "+odd.Fingerprint()+")"; len(got) != 1 || got[0] != want {
		t.Errorf("fleet rows %q, want only %q", got, want)
	}
}
