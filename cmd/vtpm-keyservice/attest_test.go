package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vtpm/internal/attest"
	"vtpm/internal/attest/attesttest"
	"vtpm/internal/attest/tpmmode"
	"vtpm/internal/guardian"
	"vtpm/internal/keyservice/client"
	"vtpm/internal/testutil"
)

// TestTPMModeOnThreeNodes: three nodes; the admin captures the attestation
// policy on a reference host and registers two hosts in TPM mode with the
// EKs host ek prints, all through vtpm keyservice. The host that booted as
// the reference attests, gets a health certificate and releases a key; the
// one whose PCR 7 differs is refused, and both are in the audit log.
func TestTPMModeOnThreeNodes(t *testing.T) {
	bin := binaries(t)
	nodes := cluster(t, bin, 3)
	admin, fleet := initCluster(t, nodes[0])
	work := t.TempDir()
	env := []string{"VTPM_KEYSERVICE_BUNDLE=" + filepath.Join(nodes[0].dir, "admin.json"), "VTPM_HOME=" + work}
	vtpm := filepath.Join(bin, "vtpm")
	ctx := context.Background()

	ref := attesttest.Start(t, attesttest.Reference)
	out := testutil.Run(t, env, vtpm, "keyservice", "policy", "capture", "fleet-boot", "--class", "x86-ovmf", "--tpm", ref.Spec, "--event-log", ref.EventLog)
	if !strings.Contains(out, "policy fleet-boot stored") {
		t.Fatalf("policy capture:\n%s", out)
	}
	off := attesttest.Start(t, attesttest.SecureBootOff)
	if out, err := testutil.RunErr(env, vtpm, "keyservice", "policy", "capture", "fleet-boot", "--class", "x86-ovmf", "--tpm", off.Spec, "--event-log", off.EventLog); err == nil || !strings.Contains(out, "Secure Boot off") || !strings.Contains(out, "fix:") {
		t.Fatalf("capture on a host with Secure Boot off: %v\n%s", err, out)
	}

	register := func(name string, boot attesttest.Boot) *client.Host {
		tpm := attesttest.Start(t, boot)
		ek := filepath.Join(work, name+".ek.pem")
		testutil.Run(t, env, vtpm, "keyservice", "host", "ek", "--tpm", tpm.Spec, "-o", ek)
		g, err := guardian.New("host:"+name, guardian.MLKEM768X25519)
		if err != nil {
			t.Fatal(err)
		}
		certs, err := g.ExportCertificates()
		if err != nil {
			t.Fatal(err)
		}
		gf := filepath.Join(work, name+".guardian.pem")
		if err := os.WriteFile(gf, certs, 0o644); err != nil {
			t.Fatal(err)
		}
		bundle := filepath.Join(work, name+".keyservice.json")
		testutil.Run(t, env, vtpm, "keyservice", "host", "add", name, "--mode", "tpm", "--ek", ek, "--policy", "fleet-boot", "--guardian", gf, "-o", bundle)
		b, err := client.ReadBundle(bundle)
		if err != nil {
			t.Fatal(err)
		}
		c, err := client.New(b, client.Options{Timeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return client.NewHost(c, tpmmode.Prover{Options: attest.HostOptions{TPM: tpm.Spec, EventLog: tpm.EventLog}})
	}
	good := register("good", attesttest.Reference)
	pcr7 := register("pcr7", attesttest.OtherDB)

	if _, err := good.Attest(ctx); err != nil {
		t.Fatalf("attestation of the host that booted as the reference: %v", err)
	}
	prot, _ := protectorFor(t, fleet)
	if _, err := good.Release(ctx, prot); err != nil {
		t.Fatalf("release: %v", err)
	}
	if _, err := pcr7.Attest(ctx); err == nil || !strings.Contains(err.Error(), "PCR 7 differs from policy fleet-boot") {
		t.Fatalf("attestation of the host whose PCR 7 differs: %v", err)
	}
	if _, err := pcr7.Release(ctx, prot); err == nil {
		t.Fatal("released a key to the host whose PCR 7 differs")
	}

	audit, err := admin.Audit(ctx, 0, true)
	if err != nil || !audit.Verified {
		t.Fatalf("audit: %v %+v", err, audit)
	}
	var okGood, deniedPCR7 bool
	for _, r := range audit.Records {
		switch {
		case r.Event == "attest" && r.Host == "good" && r.Outcome == "ok" && strings.Contains(r.Detail, "policy fleet-boot class x86-ovmf"):
			okGood = true
		case r.Event == "attest" && r.Host == "pcr7" && r.Outcome == "denied" && r.Reason == "pcr-mismatch" && strings.Contains(r.Detail, "PCR 7 differs"):
			deniedPCR7 = true
		}
	}
	if !okGood || !deniedPCR7 {
		t.Errorf("audit: good attested %v, pcr7 denied %v; records: %v", okGood, deniedPCR7, audit.Records)
	}
}
