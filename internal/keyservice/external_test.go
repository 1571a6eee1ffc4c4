package keyservice_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/internal/keyservice"
	"vtpm/internal/testutil"
)

// TestExternalEtcd: a node on an external etcd cluster (Debian's etcd 3.4)
// instead of its embedded member.
func TestExternalEtcd(t *testing.T) {
	testutil.Need(t, "etcd")
	dir := t.TempDir()
	base := testutil.FreePorts(t, 2)
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", base)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", base+1)
	etcd := exec.Command("etcd", "--name", "e1", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "e1="+peerURL, "--log-level", "warn")
	testutil.StartCmd(t, etcd, fmt.Sprintf("127.0.0.1:%d", base))

	cfg := nodeConfig(t, filepath.Join(dir, "node"))
	cfg.EtcdEndpoints = []string{clientURL}
	n := startNode(t, cfg)
	admin, fleet := initService(t, n)
	a := addHost(t, admin, "a")
	prot, dek, _ := fleetProtector(t, fleet)
	k, err := a.ks.Release(context.Background(), prot)
	if err != nil {
		t.Fatalf("release on external etcd: %v", err)
	}
	if !bytes.Equal(keyBytes(t, k), dek) {
		t.Error("released key differs")
	}
	st, err := admin.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Storage != "external" || !st.Quorum {
		t.Errorf("status: storage %q, quorum %v; want external with quorum", st.Storage, st.Quorum)
	}
}

// TestJoin: a node added to a running cluster with join gets the service
// key over the authenticated API and answers requests.
func TestJoin(t *testing.T) {
	dir := t.TempDir()
	cfg1 := nodeConfig(t, filepath.Join(dir, "n1"))
	n1 := startNode(t, cfg1)
	admin, fleet := initService(t, n1)
	ctx := context.Background()

	cfg2 := nodeConfig(t, filepath.Join(dir, "n2"))
	cfg2.Name = "n2"
	r, err := admin.AddMember(ctx, &ksv1.AddMemberRequest{Name: "n2", PeerUrls: []string{cfg2.PeerURL}})
	if err != nil {
		t.Fatalf("join: %v", err)
	}
	if err := keyservice.WriteServiceKey(filepath.Join(cfg2.DataDir, "service.key"), r.ServiceKey); err != nil {
		t.Fatal(err)
	}
	cfg2.InitialCluster, cfg2.ClusterState = r.InitialCluster, "existing"
	n2 := startNode(t, cfg2)

	// A host whose bundle names only the new node is served by it.
	a := addHost(t, admin, "a")
	a.bundle.Endpoints = []string{n2.url()}
	a = hostFromBundle(t, "a", a.guardian, a.bundle)
	prot, dek, _ := fleetProtector(t, fleet)
	k, err := a.ks.Release(ctx, prot)
	if err != nil {
		t.Fatalf("release through the joined node: %v", err)
	}
	if !bytes.Equal(keyBytes(t, k), dek) {
		t.Error("released key differs")
	}
	st, err := admin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Members) != 2 || !st.Quorum {
		t.Errorf("status after join: %d members, quorum %v; want 2 with quorum", len(st.Members), st.Quorum)
	}
}

// TestServiceKeySealedToHostTPM: with a host TPM (a swtpm process standing
// in for the hardware), the service key is sealed to it, never written in
// clear, and opens again at the node's next start.
func TestServiceKeySealedToHostTPM(t *testing.T) {
	testutil.Need(t, "swtpm")
	port := testutil.FreePorts(t, 2)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	testutil.Start(t, "swtpm", nil, addr, "--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d", port), "--ctrl", fmt.Sprintf("type=tcp,port=%d", port+1),
		"--flags", "not-need-init,startup-clear", "--tpmstate", "dir="+t.TempDir())

	cfg := nodeConfig(t, t.TempDir())
	cfg.HostTPM = "tcp:" + addr
	n := startNode(t, cfg)
	admin, fleet := initService(t, n)
	if _, err := os.Stat(filepath.Join(cfg.DataDir, "service.key")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a service key file exists beside the sealed one: %v", err)
	}
	st, err := admin.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.ServiceKeyWeaker || !strings.Contains(st.ServiceKeyStorage, "sealed to the host TPM") {
		t.Errorf("status: service key %q (weaker %v)", st.ServiceKeyStorage, st.ServiceKeyWeaker)
	}

	// The next start unseals it: the fleet guardian still opens.
	n.stop()
	n = startNode(t, cfg)
	a := addHost(t, admin, "a")
	prot, dek, _ := fleetProtector(t, fleet)
	k, err := a.ks.Release(context.Background(), prot)
	if err != nil {
		t.Fatalf("release after restart: %v", err)
	}
	if !bytes.Equal(keyBytes(t, k), dek) {
		t.Error("released key differs")
	}
}
