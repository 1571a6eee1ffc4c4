package keyservice

import (
	"context"
	"slices"
	"sync"
	"time"
)

// Member is an etcd member as the status sees it.
type Member struct {
	Name       string
	ID         uint64
	PeerURLs   []string
	ClientURLs []string
	APIURL     string
	Leader     bool
	Reachable  bool
	Error      string
}

// Status is a node's view of the service.
type Status struct {
	Node              string
	Storage           string // embedded or external
	Members           []Member
	Leader            string
	Quorum            bool
	HostsRegistered   int
	HostsAttested     int
	Expiring          []ExpiringCert // health certificates that expire within the hour
	ServiceKeyStorage string
	ServiceKeyWeaker  bool
	FleetFingerprint  string
	AuditRecords      uint64
}

// ExpiringCert is a host's health certificate near its end.
type ExpiringCert struct {
	Host     string
	NotAfter time.Time
}

// Status probes every member and summarizes the service. Without quorum
// it still answers with what it could learn.
func (s *Service) Status(ctx context.Context) (*Status, error) {
	st := &Status{Node: s.cfg.Name, Storage: "embedded"}
	if s.st.etcd == nil {
		st.Storage = "external"
	}
	st.ServiceKeyStorage, st.ServiceKeyWeaker = s.ServiceKeyStorage()
	ms := s.st.memberList()
	probe, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	st.Members = make([]Member, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		st.Members[i] = Member{Name: m.Name, ID: m.ID, PeerURLs: m.PeerURLs, ClientURLs: m.ClientURLs}
		if len(m.ClientURLs) == 0 {
			st.Members[i].Error = "not started"
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			state := probeMember(probe, m.ClientURLs[0])
			st.Members[i].Reachable = state != "unreachable"
			st.Members[i].Leader = state == "up, leader"
			if !st.Members[i].Reachable {
				st.Members[i].Error = state
			}
		}()
	}
	wg.Wait()
	up := 0
	for _, m := range st.Members {
		if m.Reachable {
			up++
		}
		if m.Leader {
			st.Leader = m.Name
		}
	}
	st.Quorum = up > len(st.Members)/2
	if !st.Quorum {
		return st, nil
	}
	if nodes, err := list[nodeRecord](ctx, s.st, keyNodes); err == nil {
		for i := range st.Members {
			if j := slices.IndexFunc(nodes, func(n nodeRecord) bool { return n.Name == st.Members[i].Name }); j >= 0 {
				st.Members[i].APIURL = nodes[j].APIURL
			}
		}
	}
	hosts, err := s.Hosts(ctx)
	if err != nil {
		return st, err
	}
	now := time.Now()
	for _, h := range hosts {
		st.HostsRegistered++
		if h.Revoked || h.HealthSerial == "" || !now.Before(h.HealthNotAfter) {
			continue
		}
		st.HostsAttested++
		if h.HealthNotAfter.Sub(now) < time.Hour {
			st.Expiring = append(st.Expiring, ExpiringCert{Host: h.Name, NotAfter: h.HealthNotAfter})
		}
	}
	if g, _, err := s.FleetGuardian(ctx); err == nil {
		st.FleetFingerprint = g.Fingerprint()
	}
	var head auditHead
	if _, _, err := s.st.getJSON(ctx, keyAuditHead, &head); err == nil {
		st.AuditRecords = head.Seq
	}
	return st, nil
}
