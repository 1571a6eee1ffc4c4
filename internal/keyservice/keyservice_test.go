package keyservice_test

import (
	"bytes"
	"context"
	"crypto/hpke"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	clientv3 "go.etcd.io/etcd/client/v3"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/internal/clirender"
	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keyservice"
	"vtpm/internal/keyservice/client"
	"vtpm/internal/testutil"
)

// node is one in-process key service node on real embedded etcd.
type node struct {
	svc    *keyservice.Service
	cfg    keyservice.Config
	cancel context.CancelFunc
	done   chan error
}

func nodeConfig(t testing.TB, dir string) keyservice.Config {
	base := testutil.FreePorts(t, 4)
	return keyservice.Config{
		Name:           "n1",
		DataDir:        dir,
		Listen:         fmt.Sprintf("127.0.0.1:%d", base),
		ClientURL:      fmt.Sprintf("http://127.0.0.1:%d", base+1),
		PeerURL:        fmt.Sprintf("http://127.0.0.1:%d", base+2),
		MetricsListen:  fmt.Sprintf("127.0.0.1:%d", base+3),
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
		RequestTimeout: 3 * time.Second,
	}
}

func startNode(t testing.TB, cfg keyservice.Config) *node {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{cfg: cfg, cancel: cancel, done: make(chan error, 1)}
	ready := make(chan *keyservice.Service, 1)
	go func() { n.done <- keyservice.Run(ctx, cfg, func(s *keyservice.Service) { ready <- s }) }()
	select {
	case n.svc = <-ready:
	case err := <-n.done:
		t.Fatalf("node %s: %v", cfg.Name, err)
	case <-time.After(60 * time.Second):
		t.Fatalf("node %s did not start", cfg.Name)
	}
	t.Cleanup(n.stop)
	return n
}

func (n *node) stop() {
	if n.cancel != nil {
		n.cancel()
		<-n.done
		n.cancel = nil
	}
}

func (n *node) url() string { return "https://" + n.cfg.Listen }

// initService runs init on n and returns an admin client and the fleet
// guardian.
func initService(t testing.TB, n *node) (*client.Client, *guardian.Guardian) {
	t.Helper()
	token, err := keyservice.ReadInitToken(filepath.Join(n.cfg.DataDir, "service.key"))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := os.ReadFile(filepath.Join(n.cfg.DataDir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	boot, err := client.NewBootstrap([]string{n.url()}, ca, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	key, pub, _ := client.NewKey()
	r, err := boot.Init(context.Background(), &ksv1.InitRequest{Token: token, FleetName: "fleet:test", AdminName: "alice", AdminPublicKey: pub})
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

// testHost is a host: its guardian, its client bundle, its key-service side.
type testHost struct {
	name     string
	guardian *guardian.Guardian
	bundle   *client.Bundle
	ks       *client.Host
}

func addHost(t testing.TB, admin *client.Client, name string, groups ...string) *testHost {
	t.Helper()
	g, err := guardian.New("host:"+name, guardian.MLKEM768X25519)
	if err != nil {
		t.Fatal(err)
	}
	certs, _ := g.ExportCertificates()
	key, pub, _ := client.NewKey()
	r, err := admin.AddHost(context.Background(), &ksv1.AddHostRequest{Host: &ksv1.Host{Name: name, Mode: "key", Groups: groups, Guardian: certs}, PublicKey: pub})
	if err != nil {
		t.Fatalf("host add %s: %v", name, err)
	}
	b, err := client.NewBundle(name, "host", r.Client.Endpoints, r.Client.CaCertificate, r.Client.Certificate, key)
	if err != nil {
		t.Fatal(err)
	}
	return hostFromBundle(t, name, g, b)
}

func hostFromBundle(t testing.TB, name string, g *guardian.Guardian, b *client.Bundle) *testHost {
	c, err := client.New(b, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return &testHost{name: name, guardian: g, bundle: b, ks: client.NewHost(c, client.KeyProver{Host: name, Guardian: g})}
}

// fleetProtector is the protector of a new TPM owned by a guardian that
// no test host holds, admitting the fleet guardian: only the key service
// can open it for them.
func fleetProtector(t testing.TB, fleet *guardian.Guardian) ([]byte, []byte, uuid.UUID) {
	t.Helper()
	owner, err := guardian.New("host:owner", guardian.MLKEM768X25519)
	if err != nil {
		t.Fatal(err)
	}
	dek := make([]byte, guardian.DEKSize)
	rand.Read(dek)
	id := uuid.New()
	p, err := guardian.NewProtector(id, dek, owner, fleet)
	if err != nil {
		t.Fatal(err)
	}
	return p.Marshal(), dek, id
}

func keyBytes(t *testing.T, k interface {
	WriteTo(io.Writer) (int64, error)
}) []byte {
	var b bytes.Buffer
	if _, err := k.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func denial(t *testing.T, err error) string {
	t.Helper()
	if err == nil {
		t.Fatal("released, want a denial")
	}
	return err.Error()
}

func TestReleaseToAttestedHostsOnly(t *testing.T) {
	n := startNode(t, nodeConfig(t, t.TempDir()))
	admin, fleet := initService(t, n)
	ctx := context.Background()

	a := addHost(t, admin, "a", "prod")
	b := addHost(t, admin, "b", "lab")
	prot, dek, id := fleetProtector(t, fleet)

	// An attested host gets the data key, sealed to its one-time key.
	k, err := a.ks.Release(ctx, prot)
	if err != nil {
		t.Fatalf("release to a: %v", err)
	}
	if !bytes.Equal(keyBytes(t, k), dek) {
		t.Fatal("released key differs from the protector's")
	}
	if k.TPM() != id {
		t.Errorf("released key names TPM %s, want %s", k.TPM(), id)
	}
	k.Close()

	// The VM may run only in group prod: b (lab) is refused, a is not.
	if err := admin.SetVMPolicy(ctx, &ksv1.VMPolicy{Tpm: id.String(), Groups: []string{"prod"}}, false); err != nil {
		t.Fatal(err)
	}
	_, err = b.ks.Release(ctx, prot)
	if msg := denial(t, err); !strings.Contains(msg, "host not in group prod") || !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("b: %v; want a permission denial naming group prod", err)
	}
	if _, err := a.ks.Release(ctx, prot); err != nil {
		t.Fatalf("release to a in group prod: %v", err)
	}

	// A removed (unregistered) host and a revoked host are refused.
	if err := admin.RemoveHost(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	_, err = b.ks.Release(ctx, prot)
	if msg := denial(t, err); !strings.Contains(msg, "not registered") {
		t.Errorf("unregistered host: %v", err)
	}
	// The remote denial renders like a local one, with its way out.
	if out := clirender.Error(err); !strings.Contains(out, "fix: register the host: `vtpm keyservice host add b --mode key --guardian CERTS.pem` (an admin of the key service)") {
		t.Errorf("rendered denial:\n%s", out)
	}
	// Registered again, b gets a new certificate; its old one stays refused.
	b2 := addHost(t, admin, "b", "prod")
	_, err = b.ks.Release(ctx, prot)
	if msg := denial(t, err); !strings.Contains(msg, "earlier registration") {
		t.Errorf("the certificate of an earlier registration: %v", err)
	}
	if _, err := b2.ks.Release(ctx, prot); err != nil {
		t.Errorf("b registered again: %v", err)
	}
	if err := admin.RevokeHost(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	_, err = a.ks.Release(ctx, prot)
	if msg := denial(t, err); !strings.Contains(msg, "revoked") {
		t.Errorf("revoked host: %v", err)
	}

	// A protector without a fleet row is refused with that reason.
	c := addHost(t, admin, "c", "prod")
	other, _ := guardian.New("host:other", guardian.MLKEM768X25519)
	dek2 := make([]byte, guardian.DEKSize)
	p2, _ := guardian.NewProtector(uuid.New(), dek2, other)
	_, err = c.ks.Release(ctx, p2.Marshal())
	if msg := denial(t, err); !strings.Contains(msg, "no row for this service's fleet guardian") {
		t.Errorf("no fleet row: %v", err)
	}

	// A host's client certificate cannot do an admin's work.
	if _, err := c.ks.Attest(ctx); err != nil {
		t.Fatal(err)
	}
	hc, _ := client.New(c.bundle, client.Options{})
	if err := hc.RevokeHost(ctx, "c"); err == nil || !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("host revoking: %v, want permission denied", err)
	}

	// A reviewer reads the audit log but changes nothing.
	rkey, rpub, _ := client.NewKey()
	ir, err := admin.IssueClient(ctx, &ksv1.IssueClientRequest{Name: "rita", Role: "reviewer", PublicKey: rpub})
	if err != nil {
		t.Fatal(err)
	}
	rb, _ := client.NewBundle("rita", "reviewer", ir.Client.Endpoints, ir.Client.CaCertificate, ir.Client.Certificate, rkey)
	reviewer, _ := client.New(rb, client.Options{})
	if _, err := reviewer.Audit(ctx, 0, true); err != nil {
		t.Errorf("reviewer reading the audit log: %v", err)
	}
	if err := reviewer.RevokeHost(ctx, "c"); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("reviewer revoking a host: %v, want permission denied", err)
	}

	// Every release and denial is in the audit log with its reason (c
	// attested at its first release and once more above).
	r, err := admin.Audit(ctx, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Verified {
		t.Fatalf("audit does not verify: %s", r.Problem)
	}
	count := map[string]int{}
	for _, x := range r.Records {
		count[x.Event+"/"+x.Reason]++
	}
	want := map[string]int{
		"release/": 3, "deny/not-in-group": 1, "deny/not-registered": 2, "deny/revoked": 1, "deny/no-fleet-row": 1,
		"register/": 4, "attest/": 5, "init/": 1, "revoke/": 1, "remove/": 1, "policy/": 1, "client/": 1,
	}
	for k, v := range want {
		if count[k] != v {
			t.Errorf("audit has %d %s records, want %d (all: %v)", count[k], k, v, count)
		}
	}

	// Metrics count releases and denials by reason.
	resp, err := http.Get("http://" + n.cfg.MetricsListen + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, line := range []string{"vtpm_keyservice_releases_total 3", `vtpm_keyservice_denials_total{reason="revoked"} 1`, `vtpm_keyservice_etcd_healthy 1`} {
		if !strings.Contains(string(body), line) {
			t.Errorf("metrics lack %q", line)
		}
	}

	// Editing one record in etcd breaks the chain at that record.
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{n.cfg.ClientURL}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	key := "/vtpm-keyservice/audit/rec/0000000000000005"
	g, err := cli.Get(ctx, key)
	if err != nil || len(g.Kvs) != 1 {
		t.Fatalf("get %s: %v", key, err)
	}
	var rec map[string]any
	json.Unmarshal(g.Kvs[0].Value, &rec)
	rec["outcome"] = "ok"
	rec["detail"] = "edited"
	edited, _ := json.Marshal(rec)
	if _, err := cli.Put(ctx, key, string(edited)); err != nil {
		t.Fatal(err)
	}
	r, err = admin.Audit(ctx, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	if r.Verified || r.FirstBad != 5 {
		t.Errorf("after editing record 5: verified %v, first bad %d (%s); want record 5", r.Verified, r.FirstBad, r.Problem)
	}
}

func TestHealthCertificateExpiry(t *testing.T) {
	cfg := nodeConfig(t, t.TempDir())
	cfg.HealthLifetime = 2 * time.Second
	n := startNode(t, cfg)
	admin, fleet := initService(t, n)
	ctx := context.Background()
	a := addHost(t, admin, "a")
	prot, _, _ := fleetProtector(t, fleet)

	notAfter, err := a.ks.Attest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	health, _ := a.ks.Health()
	for time.Now().Before(notAfter.Add(time.Second)) {
		time.Sleep(200 * time.Millisecond)
	}
	// The expired certificate is refused…
	pub, err := hpke.MLKEM768X25519().GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(a.bundle.Cert)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	who := keyservice.Identity{Name: "a", Role: keyservice.RoleHost, Serial: cert.SerialNumber.Text(16)}
	_, err = n.svc.ReleaseKey(ctx, who, prot, health, pub.PublicKey(), "r1")
	var d *keyservice.DenialError
	if !errors.As(err, &d) || d.Reason != keyservice.DenyHealthExpired {
		t.Fatalf("expired health certificate: %v, want a %s denial", err, keyservice.DenyHealthExpired)
	}
	// …and the host attests again before its next release.
	if _, err := a.ks.Release(ctx, prot); err != nil {
		t.Fatalf("release after re-attestation: %v", err)
	}
	if renewed, _ := a.ks.Health(); bytes.Equal(renewed, health) {
		t.Error("the host kept its expired health certificate")
	}
}

func TestBackupWipeRestore(t *testing.T) {
	dir := t.TempDir()
	cfg := nodeConfig(t, filepath.Join(dir, "n1"))
	n := startNode(t, cfg)
	admin, fleet := initService(t, n)
	ctx := context.Background()
	a := addHost(t, admin, "a")
	prot, dek, _ := fleetProtector(t, fleet)
	if _, err := a.ks.Release(ctx, prot); err != nil {
		t.Fatal(err)
	}
	backup, err := admin.Backup(ctx, "correct horse battery")
	if err != nil {
		t.Fatal(err)
	}

	// Wipe: the node and its data directory (its service key too) go.
	n.stop()
	if err := os.RemoveAll(cfg.DataDir); err != nil {
		t.Fatal(err)
	}
	n = startNode(t, cfg)
	token, _ := keyservice.ReadInitToken(filepath.Join(cfg.DataDir, "service.key"))
	ca, _ := os.ReadFile(filepath.Join(cfg.DataDir, "ca.pem"))
	boot, err := client.NewBootstrap([]string{n.url()}, ca, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := boot.Restore(ctx, &ksv1.RestoreRequest{Token: token, Backup: backup, Passphrase: "wrong passphrase"}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("restore with a wrong passphrase: %v", err)
	}
	r, err := boot.Restore(ctx, &ksv1.RestoreRequest{Token: token, Backup: backup, Passphrase: "correct horse battery"})
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	if r.FleetFingerprint != fleet.Fingerprint() {
		t.Errorf("restored fleet guardian %s, want %s", r.FleetFingerprint, fleet.Fingerprint())
	}

	// The host's old bundle works again (the CA came back) and the same
	// protector opens with the same fleet guardian.
	a = hostFromBundle(t, "a", a.guardian, a.bundle)
	k, err := a.ks.Release(ctx, prot)
	if err != nil {
		t.Fatalf("release after restore: %v", err)
	}
	if !bytes.Equal(keyBytes(t, k), dek) {
		t.Error("released key differs after restore")
	}
	audit, err := admin.Audit(ctx, 0, true)
	if err != nil || !audit.Verified {
		t.Fatalf("audit after restore: %v %+v", err, audit)
	}
	// A second restore onto a service with a fleet guardian is refused.
	if _, err := boot.Restore(ctx, &ksv1.RestoreRequest{Token: token, Backup: backup, Passphrase: "correct horse battery"}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("restore onto a live service: %v", err)
	}
}
