package hostd

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/clirender"
	"vtpm/internal/errdefs"
	"vtpm/internal/hostcheck"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/testutil"
	"vtpm/internal/vm"
)

// runServer runs a host service named name in this process, with its own
// data root and sockets, and stops it at cleanup.
func runServer(t *testing.T, name string) *Server {
	t.Helper()
	return runServerAt(t, name, filepath.Join(t.TempDir(), "root"))
}

// runServerAt is runServer on an existing data root.
func runServerAt(t *testing.T, name, root string) *Server {
	t.Helper()
	dir := t.TempDir()
	s, err := New(Options{
		DataRoot: root, Socket: filepath.Join(dir, "host.sock"),
		Listen: "127.0.0.1:" + strconv.Itoa(testutil.FreePorts(t, 1)), Name: name, Version: "test", HostTPM: "none",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(s.opts.DataRoot, 0o700); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	select {
	case <-s.Ready():
	case err := <-done:
		t.Fatalf("host %s: %v", name, err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("host %s stopped: %v", name, err)
		}
	})
	return s
}

func certsOf(t *testing.T, s *Server) []byte {
	t.Helper()
	b, err := s.local.Public().ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestUntrustedOnAnOpenConnection: a peer untrusted while its connection
// stays open is refused at its next call, by the API, with a clear error.
func TestUntrustedOnAnOpenConnection(t *testing.T) {
	a, b := runServer(t, "a"), runServer(t, "b")
	if _, err := a.Trust("b", b.opts.Listen, certsOf(t, b)); err != nil {
		t.Fatal(err)
	}
	pa, err := b.Trust("a", a.opts.Listen, certsOf(t, a))
	if err != nil {
		t.Fatal(err)
	}
	// One transport: the second call reuses the first call's connection.
	hc, base, err := b.PeerClient(pa.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer hc.CloseIdleConnections()
	c := hostv1connect.NewHostServiceClient(hc, base)
	ctx := context.Background()
	info, err := c.GetInfo(ctx, connect.NewRequest(&hostv1.GetInfoRequest{}))
	if err != nil {
		t.Fatalf("b asks a: %v", err)
	}
	if info.Msg.GetName() != "a" || info.Msg.GetGuardianFingerprint() != a.local.Fingerprint() {
		t.Errorf("b's view of a: %v", info.Msg)
	}
	if err := b.diagnose(pa); err != nil {
		t.Errorf("a handshake with a, which trusts b: %v", err)
	}
	metrics := func() (int, string) {
		rsp, err := hc.Get(base + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer rsp.Body.Close()
		body, _ := io.ReadAll(rsp.Body)
		return rsp.StatusCode, string(body)
	}
	if code, body := metrics(); code != http.StatusOK || !strings.Contains(body, "vtpm_host_running_vtpms 0") {
		t.Errorf("a's metrics for b: %d\n%s", code, body)
	}
	if _, err := a.Untrust("b"); err != nil {
		t.Fatal(err)
	}
	// New connections are refused in the handshake.
	var refused *RefusedError
	if err := b.diagnose(pa); !errors.As(err, &refused) || refused.Peer != "a" || refused.Host != "b" {
		t.Errorf("a handshake with a, which no longer trusts b: %v", err)
	}
	_, err = c.GetInfo(ctx, connect.NewRequest(&hostv1.GetInfoRequest{}))
	got := apierr.FromConnect(err, "on host a")
	if connect.CodeOf(err) != connect.CodePermissionDenied || !errors.Is(got, errdefs.ErrPermissionDenied) {
		t.Fatalf("b's call after a untrusted it: %v (code %v)", err, connect.CodeOf(err))
	}
	if code, _ := metrics(); code != http.StatusForbidden {
		t.Errorf("a's metrics for b, no longer trusted: %d", code)
	}
	r := clirender.Error(got)
	for _, want := range []string{"host a does not trust the calling host", "`vtpm host trust NAME ADDRESS CERTS` (on host a)"} {
		if !strings.Contains(r, want) {
			t.Errorf("refusal lacks %q:\n%s", want, r)
		}
	}
}

// TestTrustRules: names, addresses and certificates are checked, a host
// is trusted once, and peers.json keeps them across restarts.
func TestTrustRules(t *testing.T) {
	a, b := runServer(t, "a"), runServer(t, "b")
	bc := certsOf(t, b)
	tests := []struct {
		name, peer, addr string
		certs            []byte
		kind             error
	}{
		{"bad name", "-b", b.opts.Listen, bc, errdefs.ErrInvalidArgument},
		{"no port", "b", "127.0.0.1", bc, errdefs.ErrInvalidArgument},
		{"not certificates", "b", b.opts.Listen, []byte("nothing"), errdefs.ErrInvalidArgument},
		{"itself", "self", a.opts.Listen, certsOf(t, a), errdefs.ErrInvalidArgument},
		{"first", "b", b.opts.Listen, bc, nil},
		{"same name again", "b", b.opts.Listen, bc, errdefs.ErrAlreadyExists},
		{"same guardian, other name", "b2", b.opts.Listen, bc, errdefs.ErrAlreadyExists},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := a.Trust(tt.peer, tt.addr, tt.certs)
			if tt.kind == nil && err != nil || tt.kind != nil && !errors.Is(err, tt.kind) {
				t.Errorf("Trust(%q, %q) = %v, want kind %v", tt.peer, tt.addr, err, tt.kind)
			}
		})
	}
	peers, err := readPeers(a.opts.DataRoot)
	if err != nil || len(peers) != 1 || peers[0].Name != "b" || !peers[0].g.Equal(b.local) || !peers[0].OwnerTrusted {
		t.Fatalf("peers.json: %v %v", peers, err)
	}
	if _, err := a.Untrust("nobody"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("untrust of an unknown host: %v", err)
	}
}

// TestCertificateKept: a restart keeps the host's TLS key while the
// guardian and the name are the same, and issues a new one under the
// guardian when the name changes.
func TestCertificateKept(t *testing.T) {
	s := runServer(t, "a")
	ks := s.broker.Keystore()
	again, err := hostCertificate(ks, s.local, "a", listenIPs(s.opts.Listen))
	if err != nil {
		t.Fatal(err)
	}
	if string(again.Certificate[0]) != string(s.cert.Certificate[0]) {
		t.Error("the same name and address got a new certificate")
	}
	renamed, err := hostCertificate(ks, s.local, "a2", listenIPs(s.opts.Listen))
	if err != nil {
		t.Fatal(err)
	}
	if string(renamed.Certificate[0]) == string(s.cert.Certificate[0]) || renamed.Leaf.Subject.CommonName != "a2" {
		t.Error("a new name kept the old certificate")
	}
	if err := s.local.Issued(renamed.Leaf); err != nil {
		t.Errorf("the certificate is not the guardian's: %v", err)
	}
	// A certificate near its end is renewed while the service runs.
	s.certMu.Lock()
	ending := *s.cert.Leaf
	ending.NotAfter = time.Now().Add(time.Hour)
	s.cert.Leaf = &ending
	s.certMu.Unlock()
	c, err := s.certificate()
	if err != nil {
		t.Fatal(err)
	}
	if time.Until(c.Leaf.NotAfter) < renewBefore || s.local.Issued(c.Leaf) != nil || c.Leaf.Subject.CommonName != "a" {
		t.Errorf("renewed certificate: %s until %v", c.Leaf.Subject.CommonName, c.Leaf.NotAfter)
	}
}

// TestLocalJSON: a script on the host posts JSON to the local API, and a
// failure comes back as data: its kind, message and remedies.
func TestLocalJSON(t *testing.T) {
	s := runServer(t, "a")
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", s.opts.APISocket)
	}}}
	post := func(path, body string) map[string]any {
		t.Helper()
		rsp, err := c.Post("http://localhost"+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer rsp.Body.Close()
		var v map[string]any
		if err := json.NewDecoder(rsp.Body).Decode(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if got := post("/vtpm.host.v1.HostService/GetInfo", "{}"); got["name"] != "a" || got["guardianFingerprint"] != s.local.Fingerprint() {
		t.Errorf("GetInfo: %v", got)
	}
	got := post("/vtpm.host.v1.PeerService/PeerInfo", `{"name": "b"}`)
	details, _ := got["details"].([]any)
	if got["code"] != "not_found" || len(details) != 1 {
		t.Fatalf("PeerInfo of an unknown host: %v", got)
	}
	debug, _ := details[0].(map[string]any)["debug"].(map[string]any)
	remedies, _ := debug["remedies"].([]any)
	if debug["kind"] != "not_found" || debug["host"] != "a" || len(remedies) != 1 || remedies[0].(map[string]any)["action"] != "host.list" {
		t.Errorf("error detail: %v", debug)
	}
}

// TestRunFailsCleanly: a listen address in use stops Run before it
// serves, and leaves no socket behind.
func TestRunFailsCleanly(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dir := t.TempDir()
	s, err := New(Options{DataRoot: dir, Socket: filepath.Join(dir, "host.sock"), Listen: busy.Addr().String(), Name: "a", HostTPM: "none",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("Run on a busy address: %v", err)
	}
	for _, p := range []string{s.opts.APISocket, s.opts.Socket} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind (%v)", p, err)
		}
	}
}

func TestNewChecksAddresses(t *testing.T) {
	for _, o := range []Options{{Listen: "7443"}, {Metrics: "localhost"}} {
		if _, err := New(o); err == nil {
			t.Errorf("New(%+v) accepted it", o)
		}
	}
}

// TestListVMs: the VMs of the host's registry, with their TPMs' identity
// and owner, read without opening a key.
func TestListVMs(t *testing.T) {
	if _, err := os.Stat(filepath.Join(hostcheck.FirmwareDir, hostcheck.OVMFVarsMS)); err != nil {
		testutil.Missing(t, "OVMF is not installed: %v", err)
	}
	root := t.TempDir()
	reg := vm.NewRegistry(root, func() (*keybroker.Broker, error) { return keybroker.Open(root, keystore.Options{HostTPM: "none"}) })
	yes, no := true, false
	withTPM, err := reg.Create(vm.CreateOptions{Name: "web", OS: vm.Linux, TPM: &yes, NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reg.Create(vm.CreateOptions{Name: "plain", OS: vm.Linux, TPM: &no, NoDisk: true}); err != nil {
		t.Fatal(err)
	}
	s := runServerAt(t, "a", root)
	rsp, err := (&hostService{s: s}).ListVMs(context.Background(), connect.NewRequest(&hostv1.ListVMsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*hostv1.VM{}
	for _, v := range rsp.Msg.GetVms() {
		got[v.GetName()] = v
	}
	web, plain := got["web"], got["plain"]
	if len(got) != 2 || web == nil || plain == nil {
		t.Fatalf("ListVMs: %v", rsp.Msg.GetVms())
	}
	if web.GetUuid() != withTPM.VM.Config.UUID.String() || !web.GetTpmEnabled() || web.GetRunning() || web.GetTpmUuid() == "" ||
		web.GetTpmOwnerFingerprint() != s.local.Fingerprint() {
		t.Errorf("web: %v (this host's guardian %s)", web, s.local.Fingerprint())
	}
	if plain.GetTpmEnabled() || plain.GetTpmUuid() != "" {
		t.Errorf("plain: %v", plain)
	}
}
