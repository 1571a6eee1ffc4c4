package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/internal/guardian"
	"vtpm/internal/keyservice/client"
)

const ksSection = "13. Key service: releases (vtpm only: swtpm has no key service)"

// ksNode is one `vtpm-keyservice serve` process on loopback ports.
type ksNode struct {
	name, dir, listen, peer, clientURL string
	cmd                                *exec.Cmd
	done                               chan struct{}
	stderr                             bytes.Buffer
}

func (n *ksNode) url() string { return "https://" + n.listen }

// kill9 kills the node as a crash would, waits for it to be gone, and
// returns when the signal was sent.
func (n *ksNode) kill9() time.Time {
	at := time.Now()
	select {
	case <-n.done:
		return at
	default:
	}
	n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.done
	return at
}

// ksCluster is a key service of started nodes, initialized, with an admin
// client and a protector whose key only the fleet guardian opens.
type ksCluster struct {
	bin   string
	nodes []*ksNode
	admin *client.Client
	fleet *guardian.Guardian
	prot  []byte
	dek   []byte
}

func (c *ksCluster) stop() {
	for _, n := range c.nodes {
		n.kill9()
	}
}

// keyService measures key releases through real vtpm-keyservice
// processes: throughput and latency for one host and for -ks-hosts hosts
// at once, on 1 and 3 nodes; a release against opening the same kind of
// protector with a local guardian; and the time releases stop after kill
// -9 of the node every host tries first.
func (b *bench) keyService() ([]row, error) {
	if b.cfg.ksReleases <= 0 {
		return []row{{section: ksSection, skip: "-ks-releases 0"}}, nil
	}
	if _, err := os.Stat(b.keyserviceBin); err != nil {
		return []row{{section: ksSection, skip: fmt.Sprintf("no vtpm-keyservice binary (%v); `make build` puts it beside vtpm", err)}}, nil
	}
	type series struct {
		nodes, hosts int
		lat          []float64 // ms
		perSec       float64
	}
	var runs []series
	var local, single []float64 // ms: local open, and a release with 1 node and 1 host
	var recovery []float64      // ms
	for _, size := range []int{1, 3} {
		b.progress("key service: starting %d node(s)", size)
		c, err := b.startKeyService(size)
		if err != nil {
			return nil, fmt.Errorf("%d node(s): %w", size, err)
		}
		err = func() error {
			defer c.stop()
			hosts, err := c.addHosts(max(b.cfg.ksHosts, 1), c.nodes[0].url())
			if err != nil {
				return err
			}
			for _, n := range slices.Compact([]int{1, max(b.cfg.ksHosts, 1)}) {
				b.progress("key service: %d releases from %d host(s) on %d node(s)", b.cfg.ksReleases, n, size)
				lat, rate, err := c.releases(hosts[:n], b.cfg.ksReleases)
				if err != nil {
					return fmt.Errorf("%d host(s): %w", n, err)
				}
				runs = append(runs, series{nodes: size, hosts: n, lat: lat, perSec: rate})
			}
			if size == 1 {
				b.progress("key service: %d local protector opens against as many releases, interleaved", b.cfg.ksReleases)
				local, single, err = c.againstLocal(hosts[0], b.cfg.ksReleases)
				return err
			}
			if b.cfg.ksKills > 0 {
				b.progress("key service: kill -9 of the node hosts try first, during releases")
				d, err := c.recovery(b)
				if err != nil {
					return fmt.Errorf("recovery: %w", err)
				}
				recovery = append(recovery, d)
			}
			return nil
		}()
		if err != nil {
			return nil, fmt.Errorf("%d node(s): %w", size, err)
		}
	}
	// Further kills each need a fresh cluster of 3.
	for i := 1; i < b.cfg.ksKills; i++ {
		c, err := b.startKeyService(3)
		if err != nil {
			return nil, err
		}
		d, err := c.recovery(b)
		c.stop()
		if err != nil {
			return nil, fmt.Errorf("recovery: %w", err)
		}
		recovery = append(recovery, d)
	}

	var sb strings.Builder
	sb.WriteString("| measurement | nodes | hosts at once | n | releases/s | p50 ms | p99 ms | local guardian p50 ms | release/local |\n")
	sb.WriteString("|---|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range runs {
		s := slices.Clone(r.lat)
		slices.Sort(s)
		fmt.Fprintf(&sb, "| key release | %d | %d | %d | %s | %s | %s | | |\n",
			r.nodes, r.hosts, len(s), num(r.perSec), num(median(s)), num(rank(s, 0.99)))
	}
	if len(local) > 0 {
		l, s := slices.Clone(local), slices.Clone(single)
		slices.Sort(l)
		slices.Sort(s)
		lo, hi := ratioCI(local, single, 1000)
		ci := ""
		if !math.IsNaN(lo) {
			ci = fmt.Sprintf(" (%s–%s)", num(lo), num(hi))
		}
		fmt.Fprintf(&sb, "| opening a TPM's key: a release against a local protector open | 1 | 1 | %d | | %s | %s | %s | **%s**%s |\n",
			len(s), num(median(s)), num(rank(s, 0.99)), num(median(l)), num(median(s)/median(l)), ci)
	}
	if len(recovery) > 0 {
		r := slices.Clone(recovery)
		slices.Sort(r)
		fmt.Fprintf(&sb, "| recovery after kill -9 of the node hosts try first (the etcd leader), ms until a release succeeds | 3 | %d | %d | | %s | %s | | |\n",
			ksStreamHosts, len(r), num(median(r)), num(r[len(r)-1]))
	}
	fmt.Fprintf(&sb, "\nNodes: `vtpm-keyservice serve --data-dir … --name nK --listen 127.0.0.1:… --peer-url http://127.0.0.1:… "+
		"--client-url http://127.0.0.1:… --initial-cluster … --request-timeout 2s --host-tpm none` (`%s`), "+
		"one process each, started afresh for 1 and for 3 nodes; `vtpm-keyservice init`, then hosts (key mode) added and attested "+
		"through the admin API. A release is one mutual-TLS Connect call, timed in the client (`client.Host.Release`, "+
		"the host already attested): the service verifies the protector, opens the fleet row and appends the audit record "+
		"in an etcd transaction. Releases/s is all releases over the wall time of the series. The local open is "+
		"`guardian.ParseProtector` + `Open` with the host's own guardian (ML-KEM-768 + X25519), interleaved with the releases. "+
		"Recovery: %d hosts release in a stream, each listing the leader first; time from its kill until a release begun "+
		"after it succeeds (p99 column: the largest).\n\nThis section alone: `vtpm-bench -only 13 -ks-releases %d -ks-hosts %d -ks-kills %d`.\n",
		b.keyserviceShown, ksStreamHosts, b.cfg.ksReleases, b.cfg.ksHosts, b.cfg.ksKills)
	return []row{{section: ksSection, name: "key service", table: sb.String()}}, nil
}

// ksStreamHosts release keys in a stream during the kill.
const ksStreamHosts = 3

// startKeyService starts size nodes sharing one service key and inits the
// service through the first.
func (b *bench) startKeyService(size int) (*ksCluster, error) {
	dir, err := os.MkdirTemp(b.base, "keyservice-")
	if err != nil {
		return nil, err
	}
	key := make([]byte, 32)
	rand.Read(key)
	c := &ksCluster{bin: b.keyserviceBin}
	var initial []string
	for i := range size {
		n := &ksNode{name: fmt.Sprintf("n%d", i+1), dir: filepath.Join(dir, fmt.Sprintf("n%d", i+1)), done: make(chan struct{})}
		var ports [3]int
		for j := range ports {
			if ports[j], err = freePort(); err != nil {
				return nil, err
			}
		}
		n.listen = fmt.Sprintf("127.0.0.1:%d", ports[0])
		n.clientURL = fmt.Sprintf("http://127.0.0.1:%d", ports[1])
		n.peer = fmt.Sprintf("http://127.0.0.1:%d", ports[2])
		if err := os.MkdirAll(n.dir, 0o700); err != nil {
			return nil, err
		}
		// The cluster's one service key, as a file on every node (the
		// format serve reads: 64 hex digits).
		if err := os.WriteFile(filepath.Join(n.dir, "service.key"), []byte(hex.EncodeToString(key)+"\n"), 0o600); err != nil {
			return nil, err
		}
		initial = append(initial, n.name+"="+n.peer)
		c.nodes = append(c.nodes, n)
	}
	for _, n := range c.nodes {
		n.cmd = exec.Command(c.bin, "serve", "--data-dir", n.dir, "--name", n.name, "--listen", n.listen,
			"--client-url", n.clientURL, "--peer-url", n.peer, "--initial-cluster", strings.Join(initial, ","),
			"--request-timeout", "2s", "--host-tpm", "none")
		n.cmd.Env = append(os.Environ(), "VTPM_HOME="+n.dir)
		n.cmd.Stderr = &n.stderr
		if err := n.cmd.Start(); err != nil {
			c.stop()
			return nil, fmt.Errorf("start %s: %w", c.bin, err)
		}
		go func() { n.cmd.Wait(); close(n.done) }()
	}
	for _, n := range c.nodes {
		if err := waitTCP(n, 60*time.Second); err != nil {
			c.stop()
			return nil, err
		}
	}
	if err := c.init(dir); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

// waitTCP waits until a node's API port accepts connections.
func waitTCP(n *ksNode, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		select {
		case <-n.done:
			return fmt.Errorf("node %s exited: %s", n.name, strings.TrimSpace(n.stderr.String()))
		default:
		}
		if conn, err := net.DialTimeout("tcp", n.listen, time.Second); err == nil {
			conn.Close()
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("node %s: %s not ready after %v", n.name, n.listen, d)
}

// init runs `vtpm-keyservice init` on the first node, reads the admin
// bundle it writes and the fleet guardian it prints, and makes a
// protector for the fleet (and an owner host that is not registered).
func (c *ksCluster) init(dir string) error {
	n := c.nodes[0]
	bundle := filepath.Join(dir, "admin.json")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, "init", "--data-dir", n.dir, "--server", n.url(), "-o", bundle)
	cmd.Env = append(os.Environ(), "VTPM_HOME="+n.dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("vtpm-keyservice init: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	if c.fleet, err = guardian.ParseCertificates(out); err != nil {
		return fmt.Errorf("fleet guardian printed by init: %w", err)
	}
	ab, err := client.ReadBundle(bundle)
	if err != nil {
		return err
	}
	if c.admin, err = client.New(ab, client.Options{}); err != nil {
		return err
	}
	owner, err := guardian.New("host:owner", guardian.MLKEM768X25519)
	if err != nil {
		return err
	}
	c.dek = make([]byte, guardian.DEKSize)
	rand.Read(c.dek)
	p, err := guardian.NewProtector(uuid.New(), c.dek, owner, c.fleet)
	if err != nil {
		return err
	}
	c.prot = p.Marshal()
	return nil
}

// addHosts registers n hosts in key mode, each listing first as its first
// endpoint, and attests them.
func (c *ksCluster) addHosts(n int, first string) ([]*client.Host, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var hosts []*client.Host
	for i := range n {
		name := fmt.Sprintf("bench-%d-%d", time.Now().UnixNano(), i)
		g, err := guardian.New("host:"+name, guardian.MLKEM768X25519)
		if err != nil {
			return nil, err
		}
		certs, err := g.ExportCertificates()
		if err != nil {
			return nil, err
		}
		key, pub, err := client.NewKey()
		if err != nil {
			return nil, err
		}
		r, err := c.admin.AddHost(ctx, &ksv1.AddHostRequest{Host: &ksv1.Host{Name: name, Mode: "key", Guardian: certs}, PublicKey: pub})
		if err != nil {
			return nil, fmt.Errorf("add host %s: %w", name, err)
		}
		eps := []string{first}
		for _, e := range r.Client.Endpoints {
			if e != first {
				eps = append(eps, e)
			}
		}
		hb, err := client.NewBundle(name, "host", eps, r.Client.CaCertificate, r.Client.Certificate, key)
		if err != nil {
			return nil, err
		}
		hc, err := client.New(hb, client.Options{Timeout: 4 * time.Second})
		if err != nil {
			return nil, err
		}
		h := client.NewHost(hc, client.KeyProver{Host: name, Guardian: g})
		if _, err := h.Attest(ctx); err != nil {
			return nil, fmt.Errorf("attest host %s: %w", name, err)
		}
		hosts = append(hosts, h)
	}
	return hosts, nil
}

// release releases the cluster's protector once and checks the key.
func (c *ksCluster) release(ctx context.Context, h *client.Host) (time.Duration, error) {
	t0 := time.Now()
	k, err := h.Release(ctx, c.prot)
	d := time.Since(t0)
	if err != nil {
		return 0, err
	}
	var got bytes.Buffer
	k.WriteTo(&got)
	k.Close()
	if !bytes.Equal(got.Bytes(), c.dek) {
		return 0, errors.New("the service released the wrong key")
	}
	return d, nil
}

// releases makes total releases spread over the hosts, all at once, and
// returns each one's latency (ms) and releases per second.
func (c *ksCluster) releases(hosts []*client.Host, total int) ([]float64, float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// Warm-up: each host's connection and TLS session.
	for _, h := range hosts {
		if _, err := c.release(ctx, h); err != nil {
			return nil, 0, err
		}
	}
	per := (total + len(hosts) - 1) / len(hosts)
	var mu sync.Mutex
	var lat []float64
	var firstErr error
	var wg sync.WaitGroup
	start := time.Now()
	for _, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range per {
				d, err := c.release(ctx, h)
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = err
				}
				if err == nil {
					lat = append(lat, scaled(d, time.Millisecond))
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if firstErr != nil {
		return nil, 0, firstErr
	}
	return lat, float64(len(lat)) / elapsed.Seconds(), nil
}

// againstLocal interleaves opening a protector with a host's own guardian
// (what a host holding a row of the protector does) with releases of the
// fleet's row by h; both in ms.
func (c *ksCluster) againstLocal(h *client.Host, n int) (local, release []float64, err error) {
	g, err := guardian.New("host:local", guardian.MLKEM768X25519)
	if err != nil {
		return nil, nil, err
	}
	p, err := guardian.NewProtector(uuid.New(), c.dek, g)
	if err != nil {
		return nil, nil, err
	}
	raw := p.Marshal()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for i := range n {
		for _, k := range order(i) {
			if k == 0 {
				t0 := time.Now()
				q, err := guardian.ParseProtector(raw)
				if err != nil {
					return nil, nil, err
				}
				if _, _, err := q.Open([]*guardian.Guardian{g}); err != nil {
					return nil, nil, err
				}
				local = append(local, scaled(time.Since(t0), time.Millisecond))
				continue
			}
			d, err := c.release(ctx, h)
			if err != nil {
				return nil, nil, err
			}
			release = append(release, scaled(d, time.Millisecond))
		}
	}
	return local, release, nil
}

// recovery streams releases from ksStreamHosts hosts that list the etcd
// leader first, kills the leader with SIGKILL, and returns the time (ms)
// from the kill until a release begun after it succeeds.
func (c *ksCluster) recovery(b *bench) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := c.admin.Status(ctx)
	if err != nil {
		return 0, err
	}
	i := slices.IndexFunc(c.nodes, func(n *ksNode) bool { return n.name == st.Leader })
	if i < 0 {
		return 0, fmt.Errorf("no leader among the nodes: %q", st.Leader)
	}
	victim := c.nodes[i]
	hosts, err := c.addHosts(ksStreamHosts, victim.url())
	if err != nil {
		return 0, err
	}
	var mu sync.Mutex
	var killAt, gone, back time.Time // the signal; the process reaped; the first release after
	released := 0
	var failures []error
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
				t0 := time.Now()
				_, err := c.release(ctx, h)
				mu.Lock()
				switch {
				case err != nil:
					failures = append(failures, err)
				case !gone.IsZero() && t0.After(gone) && back.IsZero():
					back = time.Now()
				default:
					released++
				}
				mu.Unlock()
			}
		}()
	}
	wait := func(cond func() bool) bool {
		for ctx.Err() == nil {
			mu.Lock()
			ok := cond()
			mu.Unlock()
			if ok {
				return true
			}
			time.Sleep(5 * time.Millisecond)
		}
		return false
	}
	wait(func() bool { return released >= 3*ksStreamHosts })
	// Only releases begun once the node is gone count: one begun between
	// the signal and the process's end may still have reached it.
	mu.Lock()
	killAt = victim.kill9()
	gone = time.Now()
	mu.Unlock()
	ok := wait(func() bool { return !back.IsZero() })
	close(stop)
	wg.Wait()
	if !ok {
		return 0, fmt.Errorf("releases did not resume after the kill of %s (%d failed; first: %v)", victim.name, len(failures), errors.Join(failures[:min(1, len(failures))]...))
	}
	if len(failures) > 0 {
		b.progress("key service: %d release(s) failed around the kill; first: %v", len(failures), failures[0])
	}
	return scaled(back.Sub(killAt), time.Millisecond), nil
}
