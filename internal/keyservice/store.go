package keyservice

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"vtpm/internal/errdefs"
)

// prefix is where the service keeps everything in etcd; see the package
// documentation for the keys beneath it.
const prefix = "/vtpm-keyservice/"

const (
	keyCA         = prefix + "ca"
	keyCheck      = prefix + "service-key-check"
	keyFleet      = prefix + "fleet"
	keyHosts      = prefix + "hosts/"
	keyPolicies   = prefix + "policies/"
	keyVMPolicies = prefix + "vms/"
	keyNodes      = prefix + "nodes/"
	keyAuditHead  = prefix + "audit/head"
	keyAuditRec   = prefix + "audit/rec/"
	keyAuditReq   = prefix + "audit/req/"
)

// store is the service's etcd: an embedded member or an external cluster.
type store struct {
	cli      *clientv3.Client
	etcd     *embed.Etcd // nil for an external cluster
	external []string    // external endpoints
	timeout  time.Duration
	metrics  *Metrics
	logLevel zap.AtomicLevel

	mu      sync.Mutex
	members []memberInfo // the last member list seen, for errors without quorum
}

type memberInfo struct {
	Name       string
	ID         uint64
	PeerURLs   []string
	ClientURLs []string
}

// openStore starts the embedded member, or connects to the external
// cluster, and waits until it is ready.
func openStore(ctx context.Context, c *Config) (*store, error) {
	s := &store{timeout: c.RequestTimeout, logLevel: zap.NewAtomicLevelAt(zapcore.WarnLevel)}
	if len(c.EtcdEndpoints) > 0 {
		cli, err := clientv3.New(clientv3.Config{
			Endpoints:   c.EtcdEndpoints,
			DialTimeout: 5 * time.Second,
			Logger:      quietZap(s.logLevel),
		})
		if err != nil {
			return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "connect to etcd at %s", strings.Join(c.EtcdEndpoints, ", "))
		}
		s.cli, s.external = cli, c.EtcdEndpoints
		for _, ep := range c.EtcdEndpoints {
			s.members = append(s.members, memberInfo{Name: ep, ClientURLs: []string{ep}})
		}
		return s, nil
	}
	cfg, err := c.etcdConfig(s.logLevel)
	if err != nil {
		return nil, err
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "start the embedded etcd member %s in %s", cfg.Name, cfg.Dir)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "embedded etcd member %s", cfg.Name)
	case <-ctx.Done():
		e.Server.Stop()
		e.Close()
		return nil, ctx.Err()
	}
	s.etcd = e
	s.cli = v3client.New(e.Server)
	s.refreshMembers()
	return s, nil
}

// quietZap is etcd's logger: warnings and errors only, and nothing once
// level is raised for shutdown (a closing member reports its closed
// listeners as errors).
func quietZap(level zap.AtomicLevel) *zap.Logger {
	zc := zap.NewProductionConfig()
	zc.Level = level
	zc.OutputPaths = []string{"stderr"}
	zc.ErrorOutputPaths = []string{"stderr"}
	lg, err := zc.Build()
	if err != nil {
		return zap.NewNop()
	}
	return lg
}

// etcdConfig is the embedded member's configuration: ports on the
// configured loopback URLs, logging at warn.
func (c *Config) etcdConfig(level zap.AtomicLevel) (*embed.Config, error) {
	cfg := embed.NewConfig()
	cfg.Name = c.Name
	cfg.Dir = filepath.Join(c.DataDir, "etcd")
	peer, err := url.Parse(c.PeerURL)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "--peer-url %q", c.PeerURL)
	}
	client, err := url.Parse(c.ClientURL)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "--client-url %q", c.ClientURL)
	}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.InitialCluster = c.InitialCluster
	if cfg.InitialCluster == "" {
		cfg.InitialCluster = c.Name + "=" + c.PeerURL
	}
	cfg.InitialClusterToken = "vtpm-keyservice"
	cfg.ClusterState = embed.ClusterStateFlagNew
	if c.ClusterState == "existing" {
		cfg.ClusterState = embed.ClusterStateFlagExisting
	}
	cfg.Logger = "zap"
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{"stderr"}
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(quietZap(level))
	// Compact the history hourly: the service keeps state, not history.
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "1h"
	if err := os.MkdirAll(c.DataDir, 0o700); err != nil {
		return nil, err
	}
	return cfg, nil
}

func (s *store) close() {
	s.logLevel.SetLevel(zapcore.FatalLevel)
	if s.cli != nil {
		s.cli.Close()
	}
	if s.etcd != nil {
		s.etcd.Server.Stop()
		s.etcd.Close()
	}
}

// refreshMembers remembers the cluster's members: for the embedded member
// its local view, which needs no quorum.
func (s *store) refreshMembers() {
	if s.etcd == nil {
		return
	}
	var ms []memberInfo
	for _, m := range s.etcd.Server.Cluster().Members() {
		ms = append(ms, memberInfo{Name: m.Name, ID: uint64(m.ID), PeerURLs: m.PeerURLs, ClientURLs: m.ClientURLs})
	}
	slices.SortFunc(ms, func(a, b memberInfo) int { return strings.Compare(a.Name, b.Name) })
	s.mu.Lock()
	s.members = ms
	s.mu.Unlock()
}

func (s *store) memberList() []memberInfo {
	s.refreshMembers()
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.members)
}

// op runs f with the request timeout; a failure of etcd itself (no
// quorum, no member reachable) becomes an *UnavailableError naming the
// members and their state.
func (s *store) op(ctx context.Context, what string, f func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	// Fail fast without quorum: a member that has no leader for longer
	// than an election takes will not answer before the deadline.
	if s.etcd != nil && !s.awaitLeader(ctx, time.Second) {
		if s.metrics != nil {
			s.metrics.etcd(false)
		}
		return s.unavailable(what, errors.New("this member has no leader"))
	}
	err := f(ctx)
	// A leader change or an election in progress passes: try again until
	// the deadline. Every write the service makes is a compare-and-swap or
	// idempotent, so a retried write that had in fact committed is noticed.
	for err != nil && isTransient(err) && ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
			err = f(ctx)
		}
	}
	if err == nil || !isEtcdUnavailable(err) {
		if s.metrics != nil {
			s.metrics.etcd(true)
		}
		return err
	}
	if s.metrics != nil {
		s.metrics.etcd(false)
	}
	return s.unavailable(what, err)
}

// awaitLeader reports whether the embedded member has a leader, waiting
// up to d (or ctx) for an election to end.
func (s *store) awaitLeader(ctx context.Context, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for s.etcd.Server.Leader() == 0 {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// isTransient reports etcd's errors of a cluster between leaders.
func isTransient(err error) bool {
	switch rpctypes.Error(err) {
	case rpctypes.ErrLeaderChanged, rpctypes.ErrNoLeader, rpctypes.ErrTimeout, rpctypes.ErrTimeoutDueToLeaderFail,
		rpctypes.ErrTimeoutDueToConnectionLost, rpctypes.ErrTimeoutWaitAppliedIndex, rpctypes.ErrTooManyRequests:
		return true
	}
	return false
}

func isEtcdUnavailable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || isTransient(err) {
		return true
	}
	return status.Code(err) == codes.Unavailable || status.Code(err) == codes.DeadlineExceeded
}

// unavailable probes every member briefly and describes the cluster.
func (s *store) unavailable(what string, cause error) error {
	e := &UnavailableError{Op: what, Cause: cause.Error()}
	probe, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var wg sync.WaitGroup
	ms := s.memberList()
	e.Members = make([]MemberState, len(ms))
	for i, m := range ms {
		e.Members[i] = MemberState{Name: m.Name, URL: strings.Join(m.ClientURLs, ",")}
		if len(m.ClientURLs) == 0 {
			// Added, never started: etcd knows its peer URL only.
			e.Members[i] = MemberState{Name: "new member", URL: strings.Join(m.PeerURLs, ","), State: "not started"}
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.Members[i].State = probeMember(probe, m.ClientURLs[0])
		}()
	}
	wg.Wait()
	healthy := 0
	for _, m := range e.Members {
		if m.State == "up" || strings.HasPrefix(m.State, "up") {
			healthy++
		}
	}
	e.Quorum = healthy > len(e.Members)/2
	return e
}

// probeMember asks one member for its status.
func probeMember(ctx context.Context, endpoint string) string {
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 500 * time.Millisecond, Logger: zap.NewNop()})
	if err != nil {
		return "unreachable"
	}
	defer cli.Close()
	st, err := cli.Status(ctx, endpoint)
	if err != nil {
		return "unreachable"
	}
	if st.Leader == 0 {
		return "up, no leader"
	}
	if st.Leader == st.Header.MemberId {
		return "up, leader"
	}
	return "up"
}

// MemberState is one etcd member as a node saw it when a request failed.
type MemberState struct {
	Name  string `json:"name"`
	URL   string `json:"url"`
	State string `json:"state"` // up, up leader, up no leader, unreachable
}

// UnavailableError: the service's etcd cannot answer — no quorum, or no
// member reachable. Members says what each member was doing. It matches
// errdefs.ErrUnavailable.
type UnavailableError struct {
	Op      string
	Cause   string
	Members []MemberState
	Quorum  bool
}

func (e *UnavailableError) Error() string {
	var b strings.Builder
	if e.Quorum {
		fmt.Fprintf(&b, "key service storage unavailable (%s: %s)", e.Op, e.Cause)
	} else {
		fmt.Fprintf(&b, "key service has no quorum (%s)", e.Op)
	}
	if len(e.Members) > 0 {
		b.WriteString("; etcd members:")
		for i, m := range e.Members {
			if i > 0 {
				b.WriteString(",")
			}
			fmt.Fprintf(&b, " %s (%s) %s", m.Name, m.URL, m.State)
		}
	}
	return b.String()
}

// Is reports whether target is errdefs.ErrUnavailable.
func (e *UnavailableError) Is(target error) bool { return target == errdefs.ErrUnavailable }

// Remedies: bring members back.
func (e *UnavailableError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Advise("start the unreachable nodes of the key service; running VMs keep running meanwhile"),
		errdefs.Do(errdefs.ActionKeyServiceStatus).WithNote("see the members and the quorum"),
	}
}

// getJSON reads key into v; found is false when it does not exist.
func (s *store) getJSON(ctx context.Context, key string, v any) (found bool, rev int64, err error) {
	var resp *clientv3.GetResponse
	err = s.op(ctx, "read "+strings.TrimPrefix(key, prefix), func(ctx context.Context) error {
		var err error
		resp, err = s.cli.Get(ctx, key)
		return err
	})
	if err != nil {
		return false, 0, err
	}
	if len(resp.Kvs) == 0 {
		return false, 0, nil
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, v); err != nil {
		return true, 0, errdefs.Wrap(errdefs.ErrDataLoss, err, "%s in etcd is not valid", key)
	}
	return true, resp.Kvs[0].ModRevision, nil
}

// list reads every value under key prefix p into a new T each.
func list[T any](ctx context.Context, s *store, p string) ([]T, error) {
	var resp *clientv3.GetResponse
	err := s.op(ctx, "list "+strings.TrimPrefix(p, prefix), func(ctx context.Context) error {
		var err error
		resp, err = s.cli.Get(ctx, p, clientv3.WithPrefix())
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var v T
		if err := json.Unmarshal(kv.Value, &v); err != nil {
			return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "%s in etcd is not valid", kv.Key)
		}
		out = append(out, v)
	}
	return out, nil
}

// txn runs a transaction; ok is whether its comparisons held.
func (s *store) txn(ctx context.Context, what string, cmps []clientv3.Cmp, then []clientv3.Op, els ...clientv3.Op) (*clientv3.TxnResponse, error) {
	var resp *clientv3.TxnResponse
	err := s.op(ctx, what, func(ctx context.Context) error {
		var err error
		resp, err = s.cli.Txn(ctx).If(cmps...).Then(then...).Else(els...).Commit()
		return err
	})
	return resp, err
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}
