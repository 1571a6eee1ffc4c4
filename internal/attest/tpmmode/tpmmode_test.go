package tpmmode_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/internal/attest"
	"vtpm/internal/attest/attesttest"
	"vtpm/internal/attest/tpmmode"
	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keyservice"
	"vtpm/internal/keyservice/client"
	"vtpm/internal/keyservice/verify"
	"vtpm/internal/testutil"
)

var _ client.Prover = tpmmode.Prover{}

// startService runs one in-process key service node on real embedded etcd,
// with TPM mode, initialised; it returns an admin client and the fleet
// guardian.
func startService(t *testing.T) (*client.Client, *guardian.Guardian) {
	t.Helper()
	dir := t.TempDir()
	base := testutil.FreePorts(t, 3)
	cfg := keyservice.Config{
		Name:           "n1",
		DataDir:        dir,
		Listen:         fmt.Sprintf("127.0.0.1:%d", base),
		ClientURL:      fmt.Sprintf("http://127.0.0.1:%d", base+1),
		PeerURL:        fmt.Sprintf("http://127.0.0.1:%d", base+2),
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
		RequestTimeout: 3 * time.Second,
		// Shorter than the margin within which a host renews its health
		// certificate, so each release attests the host again.
		HealthLifetime: 30 * time.Second,
		Verifiers:      []verify.Verifier{tpmmode.Verifier{}},
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() { done <- keyservice.Run(ctx, cfg, func(*keyservice.Service) { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("key service: %v", err)
	case <-time.After(60 * time.Second):
		cancel()
		t.Fatal("the key service did not start")
	}
	t.Cleanup(func() { cancel(); <-done })

	token, err := keyservice.ReadInitToken(filepath.Join(dir, "service.key"))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	boot, err := client.NewBootstrap([]string{"https://" + cfg.Listen}, ca, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	key, pub, err := client.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	r, err := boot.Init(ctx, &ksv1.InitRequest{Token: token, FleetName: "fleet:test", AdminName: "alice", AdminPublicKey: pub})
	if err != nil {
		t.Fatalf("init: %v", err)
	}
	b, err := client.NewBundle("alice", "admin", r.Admin.Endpoints, r.Admin.CaCertificate, r.Admin.Certificate, key)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := client.New(b, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	fleet, err := guardian.ParseCertificates(r.FleetGuardian)
	if err != nil {
		t.Fatal(err)
	}
	return admin, fleet
}

// ekPEM is the EK of a host TPM, as host ek prints it.
func ekPEM(t *testing.T, tpm *attesttest.HostTPM) []byte {
	t.Helper()
	h, err := attest.OpenHost(attest.HostOptions{TPM: tpm.Spec, EventLog: tpm.EventLog})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ek, err := h.EK()
	if err != nil {
		t.Fatal(err)
	}
	b, err := attest.MarshalEK(ek)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// addTPMHost registers a host in TPM mode with the EK given and returns its
// side of the key service, attesting with tpm.
func addTPMHost(t *testing.T, admin *client.Client, name string, ek []byte, policy string, tpm *attesttest.HostTPM) *client.Host {
	t.Helper()
	g, err := guardian.New("host:"+name, guardian.MLKEM768X25519)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := g.ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	key, pub, err := client.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	r, err := admin.AddHost(context.Background(), &ksv1.AddHostRequest{
		Host:      &ksv1.Host{Name: name, Mode: verify.ModeTPM, Guardian: certs, Ek: ek, Policy: policy},
		PublicKey: pub,
	})
	if err != nil {
		t.Fatalf("host add %s: %v", name, err)
	}
	b, err := client.NewBundle(name, "host", r.Client.Endpoints, r.Client.CaCertificate, r.Client.Certificate, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(b, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return client.NewHost(c, tpmmode.Prover{Options: attest.HostOptions{TPM: tpm.Spec, EventLog: tpm.EventLog}})
}

// fleetProtector is a new TPM's protector admitting the fleet guardian,
// owned by a guardian no host holds.
func fleetProtector(t *testing.T, fleet *guardian.Guardian) []byte {
	t.Helper()
	owner, err := guardian.New("host:owner", guardian.MLKEM768X25519)
	if err != nil {
		t.Fatal(err)
	}
	dek := make([]byte, guardian.DEKSize)
	rand.Read(dek)
	p, err := guardian.NewProtector(uuid.New(), dek, owner, fleet)
	if err != nil {
		t.Fatal(err)
	}
	return p.Marshal()
}

// TestTPMModeThroughKeyService: a policy captured from a reference host;
// a host that booted the same way attests in TPM mode, gets a health
// certificate and a key, attesting again when its health certificate nears
// its end; a host whose PCR 7 differs, and a host whose TPM is not the
// registered one, are refused; each outcome is in the audit log with its
// reason.
func TestTPMModeThroughKeyService(t *testing.T) {
	admin, fleet := startService(t)
	ctx := context.Background()

	ref := attesttest.Start(t, attesttest.Reference)
	p, err := attest.CaptureHost(attest.HostOptions{TPM: ref.Spec, EventLog: ref.EventLog}, "fleet-boot", "x86-ovmf")
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.SetPolicy(ctx, keyservice.PolicyToProto(*tpmmode.ToVerify(p))); err != nil {
		t.Fatal(err)
	}

	goodTPM := attesttest.Start(t, attesttest.Reference)
	good := addTPMHost(t, admin, "good", ekPEM(t, goodTPM), "fleet-boot", goodTPM)
	pcr7TPM := attesttest.Start(t, attesttest.OtherDB)
	pcr7 := addTPMHost(t, admin, "pcr7", ekPEM(t, pcr7TPM), "fleet-boot", pcr7TPM)
	// Registered with the good host's EK, attesting with another TPM.
	otherTPM := attesttest.Start(t, attesttest.Reference)
	swapped := addTPMHost(t, admin, "swapped", ekPEM(t, goodTPM), "fleet-boot", otherTPM)

	notAfter, err := good.Attest(ctx)
	if err != nil {
		t.Fatalf("the good host's attestation: %v", err)
	}
	if cert, _ := good.Health(); cert == nil || !notAfter.After(time.Now()) {
		t.Fatalf("health certificate %d bytes until %v", len(cert), notAfter)
	}
	prot := fleetProtector(t, fleet)
	for i := range 2 {
		if _, err := good.Release(ctx, prot); err != nil {
			t.Fatalf("release %d to the attested host: %v", i+1, err)
		}
	}

	_, err = pcr7.Attest(ctx)
	if err == nil || !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "PCR 7 differs from policy fleet-boot") {
		t.Fatalf("host with another PCR 7: %v", err)
	}
	if _, err := pcr7.Release(ctx, prot); err == nil {
		t.Fatal("a key was released to a host whose PCR 7 differs from the policy")
	}
	if _, err := swapped.Attest(ctx); err == nil || !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("host with another TPM than registered: %v", err)
	}

	audit, err := admin.Audit(ctx, 0, true)
	if err != nil || !audit.Verified {
		t.Fatalf("audit: %v %+v", err, audit)
	}
	want := map[string]struct{ outcome, reason, detail string }{
		"good":    {"ok", "", "policy fleet-boot class x86-ovmf"},
		"pcr7":    {"denied", string(verify.ReasonPCRMismatch), "PCR 7 differs from policy fleet-boot"},
		"swapped": {"denied", string(verify.ReasonWrongEK), "not the one registered"},
	}
	seen := map[string]bool{}
	attests := 0
	for _, r := range audit.Records {
		w, ok := want[r.Host]
		if !ok || r.Event != "attest" {
			continue
		}
		if r.Host == "good" {
			attests++
		}
		if seen[r.Host] {
			continue
		}
		seen[r.Host] = true
		if r.Outcome != w.outcome || r.Reason != w.reason || !strings.Contains(r.Detail, w.detail) {
			t.Errorf("audit of %s: %s %q %q, want %s %q with %q", r.Host, r.Outcome, r.Reason, r.Detail, w.outcome, w.reason, w.detail)
		}
	}
	for h := range want {
		if !seen[h] {
			t.Errorf("no attestation of %s in the audit log", h)
		}
	}
	// A health certificate near its end is renewed by attesting again with
	// the TPM: once at first, once before each release.
	if attests != 3 {
		t.Errorf("the good host attested %d times, want 3", attests)
	}
}
