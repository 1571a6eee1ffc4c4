package keyservice_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"vtpm/internal/guardian"
	"vtpm/internal/keyservice"
)

// startCluster starts size in-process nodes with one service key.
func startCluster(b testing.TB, size int) []*node {
	dir := b.TempDir()
	var cfgs []keyservice.Config
	var initial []string
	for i := range size {
		c := nodeConfig(b, filepath.Join(dir, fmt.Sprint(i)))
		c.Name = fmt.Sprintf("n%d", i+1)
		c.MetricsListen = ""
		cfgs = append(cfgs, c)
		initial = append(initial, c.Name+"="+c.PeerURL)
	}
	key := make([]byte, keyservice.ServiceKeySize)
	for i := range cfgs {
		cfgs[i].InitialCluster = strings.Join(initial, ",")
		if err := keyservice.WriteServiceKey(filepath.Join(cfgs[i].DataDir, "service.key"), key); err != nil {
			b.Fatal(err)
		}
	}
	nodes := make([]*node, size)
	var wg sync.WaitGroup
	for i, c := range cfgs {
		wg.Add(1)
		go func() { defer wg.Done(); nodes[i] = startNode(b, c) }()
	}
	wg.Wait()
	return nodes
}

// BenchmarkRelease: key releases from attested hosts, one at a time or
// from 10 hosts at once, on 1 and 3 nodes. Reports releases per second
// and the p50 and p99 latency of one release.
func BenchmarkRelease(b *testing.B) {
	for _, nodes := range []int{1, 3} {
		for _, hosts := range []int{1, 10} {
			b.Run(fmt.Sprintf("nodes=%d/hosts=%d", nodes, hosts), func(b *testing.B) {
				ns := startCluster(b, nodes)
				admin, fleet := initService(b, ns[0])
				prot, _, _ := fleetProtector(b, fleet)
				var hs []*testHost
				for i := range hosts {
					h := addHost(b, admin, fmt.Sprintf("h%d", i))
					if _, err := h.ks.Attest(context.Background()); err != nil {
						b.Fatal(err)
					}
					hs = append(hs, h)
				}
				var mu sync.Mutex
				var lat []time.Duration
				b.ResetTimer()
				start := time.Now()
				var wg sync.WaitGroup
				per := (b.N + hosts - 1) / hosts
				for _, h := range hs {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for range per {
							t0 := time.Now()
							k, err := h.ks.Release(context.Background(), prot)
							d := time.Since(t0)
							if err != nil {
								b.Error(err)
								return
							}
							k.Close()
							mu.Lock()
							lat = append(lat, d)
							mu.Unlock()
						}
					}()
				}
				wg.Wait()
				elapsed := time.Since(start)
				b.StopTimer()
				slices.Sort(lat)
				b.ReportMetric(float64(len(lat))/elapsed.Seconds(), "releases/s")
				b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
				b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			})
		}
	}
}

// BenchmarkLocalOpen is what a host holding a row of the protector pays
// instead: one HPKE open with its own guardian.
func BenchmarkLocalOpen(b *testing.B) {
	g, _ := guardian.New("host:a", guardian.MLKEM768X25519)
	dek := make([]byte, guardian.DEKSize)
	p, err := guardian.NewProtector([16]byte{1}, dek, g)
	if err != nil {
		b.Fatal(err)
	}
	raw := p.Marshal()
	b.ResetTimer()
	for b.Loop() {
		q, err := guardian.ParseProtector(raw)
		if err != nil {
			b.Fatal(err)
		}
		if _, _, err := q.Open([]*guardian.Guardian{g}); err != nil {
			b.Fatal(err)
		}
	}
}
