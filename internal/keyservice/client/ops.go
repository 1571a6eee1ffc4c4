package client

import (
	"context"

	"connectrpc.com/connect"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/api/vtpm/keyservice/v1/keyservicev1connect"
)

type api = keyservicev1connect.KeyServiceClient

// unary is call for one unary method: the same request to each node in
// turn.
func unary[Req, Resp any](ctx context.Context, c *Client, m *Req, f func(api, context.Context, *connect.Request[Req]) (*connect.Response[Resp], error)) (*Resp, error) {
	return call(ctx, c, func(ctx context.Context, a api) (*Resp, error) {
		resp, err := f(a, ctx, connect.NewRequest(m))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	})
}

// Init creates the fleet guardian and the first admin's certificate.
func (c *Client) Init(ctx context.Context, m *ksv1.InitRequest) (*ksv1.InitResponse, error) {
	return unary(ctx, c, m, api.Init)
}

// Restore restores a backup onto a service without a fleet guardian.
func (c *Client) Restore(ctx context.Context, m *ksv1.RestoreRequest) (*ksv1.RestoreResponse, error) {
	return unary(ctx, c, m, api.Restore)
}

// AddHost registers a host.
func (c *Client) AddHost(ctx context.Context, m *ksv1.AddHostRequest) (*ksv1.AddHostResponse, error) {
	return unary(ctx, c, m, api.AddHost)
}

// RemoveHost unregisters a host.
func (c *Client) RemoveHost(ctx context.Context, name string) error {
	_, err := unary(ctx, c, &ksv1.RemoveHostRequest{Name: name}, api.RemoveHost)
	return err
}

// RevokeHost revokes a host.
func (c *Client) RevokeHost(ctx context.Context, name string) error {
	_, err := unary(ctx, c, &ksv1.RevokeHostRequest{Name: name}, api.RevokeHost)
	return err
}

// ListHosts lists the registered hosts.
func (c *Client) ListHosts(ctx context.Context) ([]*ksv1.Host, error) {
	r, err := unary(ctx, c, &ksv1.ListHostsRequest{}, api.ListHosts)
	return r.GetHosts(), err
}

// SetPolicy stores an attestation policy.
func (c *Client) SetPolicy(ctx context.Context, p *ksv1.Policy) error {
	_, err := unary(ctx, c, &ksv1.SetPolicyRequest{Policy: p}, api.SetPolicy)
	return err
}

// ListPolicies lists the attestation policies.
func (c *Client) ListPolicies(ctx context.Context) ([]*ksv1.Policy, error) {
	r, err := unary(ctx, c, &ksv1.ListPoliciesRequest{}, api.ListPolicies)
	return r.GetPolicies(), err
}

// SetVMPolicy stores or removes a VM policy.
func (c *Client) SetVMPolicy(ctx context.Context, p *ksv1.VMPolicy, remove bool) error {
	_, err := unary(ctx, c, &ksv1.SetVMPolicyRequest{Policy: p, Remove: remove}, api.SetVMPolicy)
	return err
}

// ListVMPolicies lists the VM policies.
func (c *Client) ListVMPolicies(ctx context.Context) ([]*ksv1.VMPolicy, error) {
	r, err := unary(ctx, c, &ksv1.ListVMPoliciesRequest{}, api.ListVMPolicies)
	return r.GetPolicies(), err
}

// IssueClient issues an admin's or reviewer's certificate.
func (c *Client) IssueClient(ctx context.Context, m *ksv1.IssueClientRequest) (*ksv1.IssueClientResponse, error) {
	return unary(ctx, c, m, api.IssueClient)
}

// AddMember adds an etcd member for a new node.
func (c *Client) AddMember(ctx context.Context, m *ksv1.AddMemberRequest) (*ksv1.AddMemberResponse, error) {
	return unary(ctx, c, m, api.AddMember)
}

// Backup returns the service state encrypted under passphrase.
func (c *Client) Backup(ctx context.Context, passphrase string) ([]byte, error) {
	r, err := unary(ctx, c, &ksv1.BackupRequest{Passphrase: passphrase}, api.Backup)
	return r.GetBackup(), err
}

// Audit returns the audit records after seq after and, with verify, the
// chain's verdict.
func (c *Client) Audit(ctx context.Context, after uint64, verify bool) (*ksv1.GetAuditResponse, error) {
	return unary(ctx, c, &ksv1.GetAuditRequest{After: after, Verify: verify}, api.GetAudit)
}

// Status returns a node's view of the service.
func (c *Client) Status(ctx context.Context) (*ksv1.StatusResponse, error) {
	return unary(ctx, c, &ksv1.StatusRequest{}, api.Status)
}

// FleetGuardian returns the fleet guardian's certificates (PEM).
func (c *Client) FleetGuardian(ctx context.Context) (*ksv1.GetFleetGuardianResponse, error) {
	return unary(ctx, c, &ksv1.GetFleetGuardianRequest{}, api.GetFleetGuardian)
}
