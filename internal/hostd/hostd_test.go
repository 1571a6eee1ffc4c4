package hostd

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"connectrpc.com/connect"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/internal/apierr"
	"vtpm/internal/clirender"
	"vtpm/internal/errdefs"
	"vtpm/internal/testutil"
)

// runServer runs a host service named name in this process, with its own
// data root and sockets, and stops it at cleanup.
func runServer(t *testing.T, name string) *Server {
	t.Helper()
	dir := t.TempDir()
	s, err := New(Options{
		DataRoot: filepath.Join(dir, "root"), Socket: filepath.Join(dir, "host.sock"),
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
	c, tr := b.peerClient(pa, nil)
	defer tr.CloseIdleConnections()
	ctx := context.Background()
	info, err := c.GetInfo(ctx, connect.NewRequest(&hostv1.GetInfoRequest{}))
	if err != nil {
		t.Fatalf("b asks a: %v", err)
	}
	if info.Msg.GetName() != "a" || info.Msg.GetGuardianFingerprint() != a.local.Fingerprint() {
		t.Errorf("b's view of a: %v", info.Msg)
	}
	if _, err := a.Untrust("b"); err != nil {
		t.Fatal(err)
	}
	_, err = c.GetInfo(ctx, connect.NewRequest(&hostv1.GetInfoRequest{}))
	got := apierr.FromConnect(err, "on host a")
	if connect.CodeOf(err) != connect.CodePermissionDenied || !errors.Is(got, errdefs.ErrPermissionDenied) {
		t.Fatalf("b's call after a untrusted it: %v (code %v)", err, connect.CodeOf(err))
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
}
