package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/encoding/protojson"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/internal/guardian"
	"vtpm/internal/keyservice"
	"vtpm/internal/keyservice/client"
	"vtpm/internal/testutil"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds vtpm and vtpm-keyservice side by side, as make install
// puts them.
func binaries(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		binDir, buildErr = os.MkdirTemp("", "vtpm-keyservice-bin-")
		if buildErr != nil {
			return
		}
		for _, c := range []string{"vtpm", "vtpm-keyservice"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, c), "./cmd/"+c)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build ./cmd/%s: %v\n%s", c, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// procNode is a vtpm-keyservice serve process.
type procNode struct {
	name, dir, listen, peer, clientURL string
	args                               []string
	proc                               *testutil.Proc
}

func (n *procNode) url() string { return "https://" + n.listen }

func (n *procNode) start(t *testing.T, bin string, wait bool) {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "vtpm-keyservice"), n.args...)
	cmd.Env = append(os.Environ(), "VTPM_HOME="+n.dir)
	ready := ""
	if wait {
		ready = n.listen
	}
	n.proc = testutil.StartCmd(t, cmd, ready)
}

func (n *procNode) waitReady(t *testing.T) {
	t.Helper()
	if err := n.proc.WaitReady(n.listen, 60*time.Second); err != nil {
		t.Fatalf("node %s: %v\n%s", n.name, err, n.proc.Stderr)
	}
}

func (n *procNode) kill9() {
	n.proc.Cmd.Process.Signal(syscall.SIGKILL)
	n.proc.Kill()
}

func cluster(t *testing.T, bin string, size int) []*procNode {
	t.Helper()
	dir := t.TempDir()
	var nodes []*procNode
	var initial []string
	key := make([]byte, keyservice.ServiceKeySize)
	rand.Read(key)
	for i := range size {
		base := testutil.FreePorts(t, 3)
		n := &procNode{
			name:      fmt.Sprintf("n%d", i+1),
			dir:       filepath.Join(dir, fmt.Sprintf("n%d", i+1)),
			listen:    fmt.Sprintf("127.0.0.1:%d", base),
			clientURL: fmt.Sprintf("http://127.0.0.1:%d", base+1),
			peer:      fmt.Sprintf("http://127.0.0.1:%d", base+2),
		}
		// The cluster's one service key, copied to every node.
		if err := keyservice.WriteServiceKey(filepath.Join(n.dir, "service.key"), key); err != nil {
			t.Fatal(err)
		}
		initial = append(initial, n.name+"="+n.peer)
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		n.args = []string{"serve", "--data-dir", n.dir, "--name", n.name, "--listen", n.listen,
			"--client-url", n.clientURL, "--peer-url", n.peer, "--initial-cluster", strings.Join(initial, ","),
			"--request-timeout", "2s"}
		n.start(t, bin, false)
	}
	for _, n := range nodes {
		n.waitReady(t)
	}
	return nodes
}

func initCluster(t *testing.T, n *procNode) (*client.Client, *guardian.Guardian) {
	t.Helper()
	token, err := keyservice.ReadInitToken(filepath.Join(n.dir, "service.key"))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := os.ReadFile(filepath.Join(n.dir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	boot, err := client.NewBootstrap([]string{n.url()}, ca, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	key, pub, _ := client.NewKey()
	r, err := boot.Init(context.Background(), &ksv1.InitRequest{Token: token, AdminPublicKey: pub, AdminName: "alice"})
	if err != nil {
		t.Fatalf("init: %v", err)
	}
	b, _ := client.NewBundle("alice", "admin", r.Admin.Endpoints, r.Admin.CaCertificate, r.Admin.Certificate, key)
	if err := b.Write(filepath.Join(n.dir, "admin.json")); err != nil {
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

// newHost registers a host whose bundle lists first the node at first.
func newHost(t *testing.T, admin *client.Client, name, first string) *client.Host {
	t.Helper()
	g, _ := guardian.New("host:"+name, guardian.MLKEM768X25519)
	certs, _ := g.ExportCertificates()
	key, pub, _ := client.NewKey()
	r, err := admin.AddHost(context.Background(), &ksv1.AddHostRequest{Host: &ksv1.Host{Name: name, Mode: "key", Guardian: certs}, PublicKey: pub})
	if err != nil {
		t.Fatal(err)
	}
	eps := []string{first}
	for _, e := range r.Client.Endpoints {
		if e != first {
			eps = append(eps, e)
		}
	}
	b, _ := client.NewBundle(name, "host", eps, r.Client.CaCertificate, r.Client.Certificate, key)
	c, err := client.New(b, client.Options{Timeout: 4 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return client.NewHost(c, client.KeyProver{Host: name, Guardian: g})
}

func protectorFor(t *testing.T, fleet *guardian.Guardian) ([]byte, []byte) {
	owner, _ := guardian.New("host:owner", guardian.MLKEM768X25519)
	dek := make([]byte, guardian.DEKSize)
	rand.Read(dek)
	p, err := guardian.NewProtector(uuid.New(), dek, owner, fleet)
	if err != nil {
		t.Fatal(err)
	}
	return p.Marshal(), dek
}

// TestClusterSurvivesANodeAndHeals: three nodes, three hosts releasing
// keys in a steady stream. kill -9 of one node: releases go on through the
// others, each audited exactly once. A second node stopped: releases are
// refused for want of quorum, naming the nodes. Both back: releases
// resume.
func TestClusterSurvivesANodeAndHeals(t *testing.T) {
	bin := binaries(t)
	nodes := cluster(t, bin, 3)
	admin, fleet := initCluster(t, nodes[0])
	adminBundle := filepath.Join(nodes[0].dir, "admin.json")
	ctx := context.Background()
	prot, dek := protectorFor(t, fleet)
	// The node to kill first is the etcd leader, and every host tries it
	// first: both the clients' failover and etcd's election are exercised.
	st, err := admin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(nodes, func(a, b *procNode) int {
		switch {
		case a.name == st.Leader:
			return -1
		case b.name == st.Leader:
			return 1
		}
		return strings.Compare(a.name, b.name)
	})
	if nodes[0].name != st.Leader {
		t.Fatalf("no leader among the nodes: %q", st.Leader)
	}
	var hosts []*client.Host
	for i := range 3 {
		hosts = append(hosts, newHost(t, admin, fmt.Sprintf("h%d", i+1), nodes[0].url()))
	}

	var mu sync.Mutex
	released, afterKill := 0, 0
	var failures []error
	killed := false
	var killAt time.Time
	var recovery time.Duration // from the kill to the first release after it, for BENCHMARKS.md
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				k, err := h.Release(ctx, prot)
				mu.Lock()
				if err != nil {
					failures = append(failures, err)
				} else {
					var b bytes.Buffer
					k.WriteTo(&b)
					k.Close()
					if !bytes.Equal(b.Bytes(), dek) {
						failures = append(failures, fmt.Errorf("wrong key released"))
					}
					released++
					if killed {
						if afterKill == 0 {
							recovery = time.Since(killAt)
						}
						afterKill++
					}
				}
				mu.Unlock()
			}
		}()
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				close(stop)
				wg.Wait()
				t.Fatalf("%s: not reached (released %d, after the kill %d, failures %v)", what, released, afterKill, failures)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	locked := func(f func() bool) func() bool {
		return func() bool { mu.Lock(); defer mu.Unlock(); return f() }
	}
	waitFor("releases before the kill", locked(func() bool { return released >= 6 }))
	// Kill the leader, which every client tries first.
	mu.Lock()
	nodes[0].kill9()
	killed, killAt = true, time.Now()
	mu.Unlock()
	waitFor("releases after the kill", locked(func() bool { return afterKill >= 9 }))
	close(stop)
	wg.Wait()
	t.Logf("releases resumed %v after the leader's kill; %d releases, %d after the kill", recovery, released, afterKill)
	if len(failures) > 0 {
		t.Errorf("%d releases failed with one node of three down; first: %v", len(failures), failures[0])
	}

	// Exactly one audit record per release, no request twice.
	r, err := admin.Audit(ctx, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Verified {
		t.Fatalf("audit does not verify: %s", r.Problem)
	}
	seen := map[string]bool{}
	audited := 0
	for _, x := range r.Records {
		if x.Event != keyservice.EventRelease {
			continue
		}
		audited++
		if seen[x.RequestId] {
			t.Errorf("request %s audited twice", x.RequestId)
		}
		seen[x.RequestId] = true
	}
	if audited != released {
		t.Errorf("%d releases audited, %d released", audited, released)
	}

	// A second node down: no quorum, and the error says which nodes.
	nodes[1].kill9()
	_, err = hosts[0].Release(ctx, prot)
	if err == nil {
		t.Fatal("released without quorum")
	}
	msg := err.Error()
	if !strings.Contains(msg, "no quorum") {
		t.Errorf("without quorum: %v; want it to say no quorum", err)
	}
	for _, n := range nodes {
		if !strings.Contains(msg, n.url()) {
			t.Errorf("the error does not name node %s (%s): %v", n.name, n.url(), err)
		}
	}

	// Both back: the cluster heals and releases resume.
	restarted := time.Now()
	nodes[0].start(t, bin, false)
	nodes[1].start(t, bin, false)
	nodes[0].waitReady(t)
	nodes[1].waitReady(t)
	deadline := time.Now().Add(90 * time.Second)
	for {
		_, err := hosts[1].Release(ctx, prot)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("releases did not resume after the nodes came back: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("releases resumed %v after both nodes were restarted", time.Since(restarted))

	// The CLI, through vtpm: status and audit --verify.
	out, err := testutil.RunErr([]string{"VTPM_KEYSERVICE_BUNDLE=" + adminBundle}, filepath.Join(bin, "vtpm"), "keyservice", "status")
	if err != nil || !strings.Contains(out, "quorum:       true") || strings.Count(out, "https://127.0.0.1") != 3 {
		t.Errorf("vtpm keyservice status: %v\n%s", err, out)
	}
	out, err = testutil.RunErr([]string{"VTPM_KEYSERVICE_BUNDLE=" + adminBundle}, filepath.Join(bin, "vtpm"), "keyservice", "audit", "--verify")
	if err != nil || !strings.Contains(out, "hash chain intact") {
		t.Errorf("vtpm keyservice audit --verify: %v\n%s", err, out)
	}
}

// TestSingleNodeDefault: serve with no flags serves from an embedded etcd
// in the default data directory; the admin commands through vtpm find it.
// Then backup, wipe, restore, with the same fleet guardian.
func TestSingleNodeDefault(t *testing.T) {
	bin := binaries(t)
	home := t.TempDir()
	env := []string{"VTPM_HOME=" + home}
	serve := func() *testutil.Proc {
		cmd := exec.Command(filepath.Join(bin, "vtpm-keyservice"), "serve")
		cmd.Env = append(os.Environ(), env...)
		return testutil.StartCmd(t, cmd, keyservice.DefaultListen)
	}
	vtpm := func(args ...string) string {
		t.Helper()
		return testutil.Run(t, env, filepath.Join(bin, "vtpm"), append([]string{"keyservice"}, args...)...)
	}
	node := serve()
	fleet := vtpm("init")
	if !strings.Contains(fleet, "BEGIN CERTIFICATE") {
		t.Errorf("init printed no fleet guardian:\n%s", fleet)
	}
	if _, err := os.Stat(filepath.Join(home, "keyservice", "etcd", "member")); err != nil {
		t.Errorf("no embedded etcd in the default data directory: %v", err)
	}
	out := vtpm("status")
	for _, want := range []string{"quorum:       true", "embedded etcd", "weaker"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}

	g, _ := guardian.New("host:b", guardian.MLKEM768X25519)
	certs, _ := g.ExportCertificates()
	certFile := filepath.Join(home, "b.pem")
	os.WriteFile(certFile, certs, 0o644)
	vtpm("host", "add", "b", "--guardian", certFile, "--group", "prod", "-o", filepath.Join(home, "b.json"))
	vtpm("host", "revoke", "b")
	// (protojson varies its spacing on purpose: parse, never match text.)
	var hosts ksv1.ListHostsResponse
	if out := vtpm("host", "list", "--json"); protojson.Unmarshal([]byte(out), &hosts) != nil ||
		len(hosts.Hosts) != 1 || !hosts.Hosts[0].Revoked || !slices.Equal(hosts.Hosts[0].Groups, []string{"prod"}) {
		t.Errorf("host list --json:\n%s", out)
	}
	var audit ksv1.GetAuditResponse
	out = vtpm("audit", "--json")
	if err := protojson.Unmarshal([]byte(out), &audit); err != nil || !slices.ContainsFunc(audit.Records, func(r *ksv1.AuditRecord) bool { return r.Event == keyservice.EventRevoke && r.Host == "b" }) {
		t.Errorf("audit --json lacks the revocation (%v):\n%s", err, out)
	}
	pass := filepath.Join(home, "pass")
	os.WriteFile(pass, []byte("correct horse battery\n"), 0o600)
	backup := filepath.Join(home, "ks.backup")
	vtpm("backup", "-o", backup, "--passphrase-file", pass)

	// Wipe the node, start it afresh, restore.
	node.Kill()
	os.Rename(filepath.Join(home, "keyservice", "admin.json"), filepath.Join(home, "admin.json"))
	if err := os.RemoveAll(filepath.Join(home, "keyservice")); err != nil {
		t.Fatal(err)
	}
	serve()
	out = vtpm("restore", backup, "--passphrase-file", pass)
	if !strings.Contains(out, "fleet guardian") {
		t.Errorf("restore: %s", out)
	}
	// The old admin bundle works again; the fleet guardian is the same.
	// (init's output also holds its note on stderr.)
	if got := vtpm("fleet-guardian", "--bundle", filepath.Join(home, "admin.json")); !strings.HasSuffix(fleet, got) {
		t.Errorf("fleet guardian after restore differs:\n%s\nwant\n%s", got, fleet)
	}
	if out := vtpm("audit", "--verify", "--bundle", filepath.Join(home, "admin.json")); !strings.Contains(out, "hash chain intact") {
		t.Errorf("audit --verify after restore: %s", out)
	}
}
