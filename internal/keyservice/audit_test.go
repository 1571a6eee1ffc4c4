package keyservice

import (
	"crypto/sha256"
	"strings"
	"testing"
)

func chain(n int) ([]AuditRecord, auditHead) {
	prev := make([]byte, sha256.Size)
	var recs []AuditRecord
	for i := range n {
		r := AuditRecord{Seq: uint64(i + 1), Event: EventRelease, Outcome: "ok", Prev: prev}
		r.Hash = r.computeHash()
		r.MAC = testMAC(r.Hash)
		prev = r.Hash
		recs = append(recs, r)
	}
	return recs, auditHead{Seq: uint64(n), Hash: prev}
}

var testKey, _ = newServiceKey(make([]byte, ServiceKeySize), "test", "test", true)

func testMAC(hash []byte) []byte { return testKey.auditMAC(hash) }

func TestCheckChain(t *testing.T) {
	tests := []struct {
		name     string
		change   func(recs []AuditRecord, head *auditHead) []AuditRecord
		firstBad uint64
	}{
		{"intact", func(r []AuditRecord, _ *auditHead) []AuditRecord { return r }, 0},
		{"a field edited", func(r []AuditRecord, _ *auditHead) []AuditRecord { r[2].Outcome = "denied"; return r }, 3},
		{"edited and rehashed", func(r []AuditRecord, _ *auditHead) []AuditRecord {
			r[2].Host = "x"
			r[2].Hash = r[2].computeHash()
			return r
		}, 3},
		{"the chain rewritten from a record on, without the service key", func(r []AuditRecord, h *auditHead) []AuditRecord {
			r[2].Host = "x"
			for i := 2; i < len(r); i++ {
				r[i].Prev = r[i-1].Hash
				r[i].Hash = r[i].computeHash()
			}
			h.Hash = r[len(r)-1].Hash
			return r
		}, 3},
		{"a record removed", func(r []AuditRecord, _ *auditHead) []AuditRecord { return append(r[:1], r[2:]...) }, 2},
		{"two swapped", func(r []AuditRecord, _ *auditHead) []AuditRecord { r[1], r[2] = r[2], r[1]; return r }, 2},
		{"the last removed", func(r []AuditRecord, _ *auditHead) []AuditRecord { return r[:4] }, 5},
		{"the last replaced", func(r []AuditRecord, _ *auditHead) []AuditRecord {
			r[4].Detail = "other"
			r[4].Hash = r[4].computeHash()
			r[4].MAC = testMAC(r[4].Hash)
			return r
		}, 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			recs, head := chain(5)
			recs = tt.change(recs, &head)
			v := checkChain(recs, head, true, testMAC)
			if v.FirstBad != tt.firstBad {
				t.Errorf("first bad %d (%s), want %d", v.FirstBad, v.Problem, tt.firstBad)
			}
		})
	}
}

func TestValidateNamesTheFlag(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		flag string
	}{
		{"listen without a port", Config{Listen: "127.0.0.1"}, "--listen"},
		{"any address without an advertised URL", Config{Listen: "0.0.0.0:7443"}, "--advertise-url"},
		{"a cluster without this node", Config{Name: "n4", InitialCluster: "n1=http://127.0.0.1:1"}, "--initial-cluster"},
		{"external etcd and members", Config{Name: "n1", InitialCluster: "n1=http://127.0.0.1:1", EtcdEndpoints: []string{"http://127.0.0.1:2"}}, "--etcd-endpoints"},
		{"a bad cluster state", Config{ClusterState: "old"}, "--initial-cluster-state"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.cfg
			c.DataDir = t.TempDir()
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tt.flag) {
				t.Errorf("Validate: %v; want an error naming %s", err, tt.flag)
			}
		})
	}
}
