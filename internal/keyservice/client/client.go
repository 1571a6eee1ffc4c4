package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"

	"vtpm/api/vtpm/keyservice/v1/keyservicev1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/errdefs"
)

// Client calls the key service, trying its nodes in turn: a node that
// cannot be reached, or whose etcd cannot answer, passes the call to the
// next. It is safe for concurrent use.
type Client struct {
	bundle  *Bundle
	nodes   []node
	timeout time.Duration
}

type node struct {
	url string
	api keyservicev1connect.KeyServiceClient
}

// Options tune a Client.
type Options struct {
	// Timeout bounds one attempt at one node (5 s by default).
	Timeout time.Duration
}

// New returns a client for the bundle's nodes.
func New(b *Bundle, opts Options) (*Client, error) {
	cfg, err := b.TLSConfig()
	if err != nil {
		return nil, err
	}
	return newClient(b, cfg, b.Endpoints, opts), nil
}

// NewBootstrap returns a client without a certificate, for Init and
// Restore (authorized by the init token), that trusts the CA in caPEM.
func NewBootstrap(endpoints []string, caPEM []byte, opts Options) (*Client, error) {
	b := &Bundle{Name: "bootstrap", Endpoints: endpoints, CA: caPEM}
	cfg, err := b.TLSConfig()
	if err != nil {
		return nil, err
	}
	return newClient(b, cfg, endpoints, opts), nil
}

func newClient(b *Bundle, cfg *tls.Config, endpoints []string, opts Options) *Client {
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Second
	}
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 16}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP2(true)
	hc := &http.Client{Transport: tr}
	c := &Client{bundle: b, timeout: opts.Timeout}
	for _, u := range endpoints {
		c.nodes = append(c.nodes, node{url: u, api: keyservicev1connect.NewKeyServiceClient(hc, u)})
	}
	return c
}

// Bundle returns the client's bundle.
func (c *Client) Bundle() *Bundle { return c.bundle }

// Tried is one node a failed call tried, and what became of it.
type Tried struct {
	URL   string `json:"url"`
	State string `json:"state"` // unreachable, no quorum, …
}

// UnavailableError: no node of the key service could answer. Tried names
// each node and its state. It matches errdefs.ErrUnavailable.
type UnavailableError struct {
	Tried []Tried
	Last  error // the last node's error
}

func (e *UnavailableError) Error() string {
	var b strings.Builder
	b.WriteString("key service unavailable; tried")
	for i, t := range e.Tried {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, " %s (%s)", t.URL, t.State)
	}
	return b.String()
}

// Is reports whether target is errdefs.ErrUnavailable.
func (e *UnavailableError) Is(target error) bool { return target == errdefs.ErrUnavailable }

// Remedies: what the last node said, or to start nodes.
func (e *UnavailableError) Remedies() []errdefs.Remedy {
	if rs := errdefs.Remedies(e.Last); len(rs) > 0 {
		return rs
	}
	return []errdefs.Remedy{errdefs.Advise("start the key service's nodes; running VMs keep running meanwhile")}
}

// call runs f against each node in turn until one answers (success or a
// decision); a node that cannot answer is recorded and skipped.
func call[T any](ctx context.Context, c *Client, f func(ctx context.Context, api keyservicev1connect.KeyServiceClient) (T, error)) (T, error) {
	var zero T
	ue := &UnavailableError{}
	for _, n := range c.nodes {
		actx, cancel := context.WithTimeout(ctx, c.timeout)
		v, err := f(actx, n.api)
		cancel()
		if err == nil {
			return v, nil
		}
		if ctx.Err() != nil {
			return zero, ctx.Err()
		}
		state, next := unanswered(err)
		if !next {
			return zero, apierr.FromConnect(err, "")
		}
		ue.Tried = append(ue.Tried, Tried{URL: n.url, State: state})
		ue.Last = apierr.FromConnect(err, "")
	}
	return zero, ue
}

// unanswered says whether err means the node could not answer (and the
// next should be tried), and its state: the node's own words when it
// answered (its etcd has no quorum), else why it could not be reached.
func unanswered(err error) (string, bool) {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return "unreachable: " + err.Error(), true
	}
	answered := len(ce.Details()) > 0
	switch ce.Code() {
	case connect.CodeUnavailable:
		if answered {
			return ce.Message(), true
		}
		return "unreachable: " + ce.Message(), true
	case connect.CodeDeadlineExceeded, connect.CodeCanceled:
		return "no answer in time", true
	case connect.CodeUnknown, connect.CodeInternal:
		if !answered {
			return "unreachable: " + ce.Message(), true
		}
	}
	return "", false
}
