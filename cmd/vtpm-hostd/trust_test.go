package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"vtpm/internal/hostd"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/testutil"
)

// host is one host of a test: its own data root, key and API sockets, and
// a vtpm-hostd serving the API on a loopback port.
type host struct {
	name, dir, root, keySock, apiSock, addr string
	proc                                    *testutil.Proc
}

// env is the environment of vtpm commands run "on" h.
func (h *host) env() []string {
	return []string{"VTPM_HOME=" + h.root, "VTPM_HOST_TPM=none", hostd.APISocketEnv + "=" + h.apiSock, hostsvc.SocketEnv + "=" + h.keySock}
}

// vtpm runs `vtpm ARGS…` on h (host commands forward to vtpm-hostd).
func (h *host) vtpm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	testutil.HostdBinary(t) // beside vtpm, where vtpm looks for it
	cmd := exec.Command(testutil.Binary(t), args...)
	cmd.Env = append(os.Environ(), h.env()...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (h *host) mustVTPM(t *testing.T, args ...string) string {
	t.Helper()
	out, err := h.vtpm(t, args...)
	if err != nil {
		t.Fatalf("on %s: vtpm %s: %v\n%s", h.name, strings.Join(args, " "), err, out)
	}
	return out
}

// newHost makes a host's directories and port without starting it.
func newHost(t *testing.T, name string) *host {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	h := &host{name: name, dir: dir, root: filepath.Join(dir, "root"), keySock: filepath.Join(dir, "run", "host.sock"),
		apiSock: filepath.Join(dir, "run", "api.sock"), addr: "127.0.0.1:" + strconv.Itoa(testutil.FreePorts(t, 1))}
	if err := os.MkdirAll(h.root, 0o700); err != nil {
		t.Fatal(err)
	}
	return h
}

// start runs `vtpm host serve` for h (through vtpm, as a user would) and
// waits for its API.
func (h *host) start(t *testing.T, extra ...string) {
	t.Helper()
	testutil.HostdBinary(t) // beside vtpm, where vtpm looks for it
	args := append([]string{"host", "serve", "--socket", h.keySock, "--data-root", h.root, "--listen", h.addr, "--name", h.name}, extra...)
	cmd := exec.Command(testutil.Binary(t), args...)
	cmd.Env = append(os.Environ(), h.env()...)
	h.proc = testutil.StartCmd(t, cmd, h.addr)
	if err := h.proc.WaitReady(h.apiSock, 10*time.Second); err != nil {
		t.Fatalf("%s: %v\n%s", h.name, err, h.proc.Stderr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("host %s's service:\n%s", h.name, h.proc.Stderr)
		}
	})
}

func (h *host) stop() { h.proc.Kill() }

// certs exports h's guardian's public certificates.
func (h *host) certs(t *testing.T) string {
	t.Helper()
	f := filepath.Join(h.dir, h.name+".pem")
	h.mustVTPM(t, "guardian", "export", "--certs-only", "-o", f)
	return f
}

// fingerprint is h's guardian's, as `host info` reports it.
func (h *host) fingerprint(t *testing.T) string {
	t.Helper()
	var info hostd.HostInfo
	if err := json.Unmarshal([]byte(h.mustVTPM(t, "host", "info", "--json")), &info); err != nil {
		t.Fatal(err)
	}
	return info.Fingerprint
}

func (h *host) list(t *testing.T) map[string]hostd.PeerListing {
	t.Helper()
	cmd := exec.Command(testutil.Binary(t), "host", "list", "--json")
	cmd.Env = append(os.Environ(), h.env()...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("on %s: vtpm host list --json: %v", h.name, err)
	}
	var list []hostd.PeerListing
	if err := json.Unmarshal(out, &list); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	m := map[string]hostd.PeerListing{}
	for _, l := range list {
		m[l.Name] = l
	}
	return m
}

func wantAll(t *testing.T, what, got string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Errorf("%s lacks %q:\n%s", what, w, got)
		}
	}
}

// TestHostsTrustEachOther: hosts a and b exchange their guardians'
// certificates and trust each other; a asks b through its own service. c,
// which a does not trust, is refused by a's TLS handshake and told how to
// be admitted; a certificate issued under another guardian at b's address
// is reported as changed and refused.
func TestHostsTrustEachOther(t *testing.T) {
	a, b, c := newHost(t, "a"), newHost(t, "b"), newHost(t, "c")
	metrics := "127.0.0.1:" + strconv.Itoa(testutil.FreePorts(t, 1))
	a.start(t, "--metrics", metrics)
	b.start(t)
	c.start(t)
	aPEM, bPEM := a.certs(t), b.certs(t)
	bFP := b.fingerprint(t)

	out := a.mustVTPM(t, "host", "trust", "b", b.addr, bPEM)
	wantAll(t, "host trust", out, "trusting host b at "+b.addr, bFP, "now open here")
	b.mustVTPM(t, "host", "trust", "a", a.addr, aPEM)
	// Trusting a host trusts its guardian as an owner of key protectors.
	wantAll(t, "guardian list on a", a.mustVTPM(t, "guardian", "list"), bFP[:16]+"  MLKEM768-X25519  host:vm  (trusted only")

	t.Run("a asks b", func(t *testing.T) {
		var info hostd.HostInfo
		if err := json.Unmarshal([]byte(a.mustVTPM(t, "host", "info", "b", "--json")), &info); err != nil {
			t.Fatal(err)
		}
		if info.Name != "b" || info.Fingerprint != bFP || info.Version == "" {
			t.Errorf("a's view of b: %+v, want b with fingerprint %s", info, bFP)
		}
		got := a.list(t)["b"]
		if !got.Reachable || got.Certificate != "trusted" || got.Version == "" || got.Fingerprint != bFP || got.Error != "" {
			t.Errorf("a lists b as %+v", got)
		}
		wantAll(t, "host list", a.mustVTPM(t, "host", "list"), "NAME", "CERTIFICATE", "b", b.addr, "yes", "trusted")
	})

	t.Run("an untrusted host is refused", func(t *testing.T) {
		// c trusts a, a does not trust c: a's handshake refuses c.
		c.mustVTPM(t, "host", "trust", "a", a.addr, aPEM)
		out, err := c.vtpm(t, "host", "info", "a")
		if err == nil {
			t.Fatalf("c reached a, which does not trust it:\n%s", out)
		}
		wantAll(t, "c's refusal", out, "host a refused this host's certificate in the TLS handshake: it does not trust host c",
			"fix: export this host's certificates: `vtpm guardian export --certs-only -o c.pem`",
			"fix: and trust them there: `vtpm host trust c "+c.addr+" c.pem` (on host a)")
		got := c.list(t)["a"]
		if !got.Reachable || got.Certificate != "trusted" || !strings.Contains(got.Error, "does not trust host c") {
			t.Errorf("c lists a as %+v", got)
		}
		// The handshake itself refuses a client certificate no trusted
		// guardian issued, and one that sends none.
		for _, certs := range [][]tls.Certificate{{selfSigned(t)}, nil} {
			if err := handshake(a.addr, certs); err == nil {
				t.Errorf("a's TLS API admitted a client with %d certificates", len(certs))
			}
		}
	})

	t.Run("a changed certificate is reported", func(t *testing.T) {
		// Another host, with a guardian of its own, answers at b's address.
		b.stop()
		b2 := newHost(t, "b")
		b2.addr = b.addr
		b2.start(t)
		b2FP := b2.fingerprint(t)
		got := a.list(t)["b"]
		if got.Certificate != "changed" || got.PresentedFingerprint != b2FP || got.Fingerprint != bFP {
			t.Errorf("a lists b, now under guardian %s, as %+v", b2FP, got)
		}
		wantAll(t, "host list", a.mustVTPM(t, "host", "list"), "CHANGED")
		out, err := a.vtpm(t, "host", "info", "b")
		if err == nil {
			t.Fatalf("a accepted b's changed certificate:\n%s", out)
		}
		wantAll(t, "a's refusal of b", out, "host b ("+b.addr+") presented a certificate not issued by its trusted guardian (fingerprint "+bFP+") but with guardian fingerprint "+b2FP,
			"`vtpm host untrust b`", "`vtpm host trust b "+b.addr+" b.pem`")
		// Untrusting b withdraws its guardian's trust as an owner too.
		a.mustVTPM(t, "host", "untrust", "b")
		if strings.Contains(a.mustVTPM(t, "guardian", "list"), bFP[:16]) {
			t.Error("b's guardian is still trusted on a after host untrust b")
		}
		if _, ok := a.list(t)["b"]; ok {
			t.Error("a still lists b")
		}
	})

	t.Run("metrics", func(t *testing.T) {
		// A key request the key socket refuses (the TPM's protector is a
		// link, which the service never follows) counts as a key-open
		// failure.
		dir := t.TempDir()
		if err := os.Symlink("/etc/passwd", filepath.Join(dir, "protector.json")); err != nil {
			t.Fatal(err)
		}
		if _, err := (hostsvc.Client{Socket: a.keySock}).Open(dir, keybroker.OpenOptions{}); err == nil {
			t.Fatal("the key socket opened a TPM whose protector is a link")
		}
		rsp, err := http.Get("http://" + metrics + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer rsp.Body.Close()
		parser := expfmt.NewTextParser(model.LegacyValidation)
		families, err := parser.TextToMetricFamilies(rsp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if f := families["vtpm_host_running_vtpms"]; f == nil || f.GetMetric()[0].GetGauge().GetValue() != 0 {
			t.Errorf("running vTPMs: %v", f)
		}
		if f := families["vtpm_host_migrations_total"]; f == nil || len(f.GetMetric()) != 6 {
			t.Errorf("migrations: %v", f)
		}
		failures := 0.0
		for _, m := range families["vtpm_host_key_open_failures_total"].GetMetric() {
			failures += m.GetCounter().GetValue()
		}
		if failures < 1 {
			t.Errorf("key-open failures: %v", families["vtpm_host_key_open_failures_total"])
		}
	})
}

// TestServiceNotRunning: the client commands say how to start the service
// they could not reach.
func TestServiceNotRunning(t *testing.T) {
	h := newHost(t, "a")
	out, err := h.vtpm(t, "host", "list")
	if err == nil {
		t.Fatalf("host list without a service succeeded:\n%s", out)
	}
	wantAll(t, "host list", out, "cannot reach the host service at "+h.apiSock, "fix: start it: `systemctl start vtpm-host.socket`",
		"fix: or run it in the foreground: `vtpm host serve --socket "+h.keySock+"`")
}

// selfSigned is a client certificate no guardian issued.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "intruder"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// handshake connects to addr over TLS 1.3 presenting certs and reads: in
// TLS 1.3 the server's verdict on the client's certificate arrives as an
// alert after the client's side of the handshake, and an admitted client
// gets the HTTP/2 server's settings unasked. It returns nil when the server
// sent data. (Nothing is written: a write could meet the connection reset
// before the alert is read.)
func handshake(addr string, certs []tls.Certificate) error {
	conn, err := tls.Dial("tcp", addr, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: certs, InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = conn.Read(make([]byte, 1))
	var op *net.OpError
	if err != nil && !(errors.As(err, &op) && op.Op == "remote error") {
		return errors.New("not refused by an alert: " + err.Error())
	}
	return err
}
