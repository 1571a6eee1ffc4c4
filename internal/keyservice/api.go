package keyservice

import (
	"context"
	"crypto"
	"crypto/hpke"
	"crypto/x509"
	"time"

	"connectrpc.com/connect"

	ksv1 "vtpm/api/vtpm/keyservice/v1"
	"vtpm/api/vtpm/keyservice/v1/keyservicev1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/errdefs"
	"vtpm/internal/keyservice/verify"
)

// api is the Connect shim: it checks the caller's role, turns messages
// into domain values and errors into errors as data. It holds no logic.
type api struct {
	keyservicev1connect.UnimplementedKeyServiceHandler
	s *Service
}

var _ keyservicev1connect.KeyServiceHandler = (*api)(nil)

type identityKey struct{}

// withIdentity returns ctx carrying the caller's identity.
func withIdentity(ctx context.Context, id *Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// allow returns the caller's identity if its role is one of roles.
func allow(ctx context.Context, roles ...Role) (Identity, error) {
	id, _ := ctx.Value(identityKey{}).(*Identity)
	if id == nil {
		return Identity{}, errdefs.New(errdefs.ErrPermissionDenied, "this call needs a client certificate issued by the key service").With(
			errdefs.Advise("use the client bundle that init, host add or an admin issued"))
	}
	for _, r := range roles {
		if id.Role == r {
			return *id, nil
		}
	}
	return Identity{}, &RoleError{Name: id.Name, Role: id.Role, Need: roles}
}

// RoleError: the caller's certificate has a role that may not make the
// call. It matches errdefs.ErrPermissionDenied.
type RoleError struct {
	Name string
	Role Role
	Need []Role
}

func (e *RoleError) Error() string {
	need := ""
	for i, r := range e.Need {
		if i > 0 {
			need += " or "
		}
		need += string(r)
	}
	return "client " + e.Name + " has role " + string(e.Role) + "; this call needs " + need
}

// Is reports whether target is errdefs.ErrPermissionDenied.
func (e *RoleError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

func (a *api) out(err error) error { return apierr.ToConnect(err, a.s.cfg.Name) }

func parsePub(der []byte) (crypto.PublicKey, error) {
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "the client's public key")
	}
	return pub, nil
}

func clientCert(i *Issued) *ksv1.ClientCertificate {
	return &ksv1.ClientCertificate{Certificate: i.Cert.Raw, CaCertificate: i.CA.Raw, Endpoints: i.Endpoints}
}

func (a *api) Init(ctx context.Context, r *connect.Request[ksv1.InitRequest]) (*connect.Response[ksv1.InitResponse], error) {
	pub, err := parsePub(r.Msg.AdminPublicKey)
	if err != nil {
		return nil, a.out(err)
	}
	certs, admin, err := a.s.Init(ctx, r.Msg.Token, r.Msg.FleetName, r.Msg.AdminName, pub)
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.InitResponse{FleetGuardian: certs, Admin: clientCert(admin)}), nil
}

func (a *api) Restore(ctx context.Context, r *connect.Request[ksv1.RestoreRequest]) (*connect.Response[ksv1.RestoreResponse], error) {
	fp, n, err := a.s.Restore(ctx, r.Msg.Token, r.Msg.Backup, r.Msg.Passphrase)
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.RestoreResponse{FleetFingerprint: fp, Keys: uint64(n)}), nil
}

func (a *api) AddHost(ctx context.Context, r *connect.Request[ksv1.AddHostRequest]) (*connect.Response[ksv1.AddHostResponse], error) {
	who, err := allow(ctx, RoleAdmin)
	if err != nil {
		return nil, a.out(err)
	}
	pub, err := parsePub(r.Msg.PublicKey)
	if err != nil {
		return nil, a.out(err)
	}
	h := r.Msg.GetHost()
	issued, err := a.s.AddHost(ctx, who, HostSpec{Name: h.GetName(), Mode: h.GetMode(), Groups: h.GetGroups(), Guardian: h.GetGuardian(), EK: h.GetEk(), Policy: h.GetPolicy()}, pub)
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.AddHostResponse{Client: clientCert(issued)}), nil
}

func (a *api) RemoveHost(ctx context.Context, r *connect.Request[ksv1.RemoveHostRequest]) (*connect.Response[ksv1.RemoveHostResponse], error) {
	who, err := allow(ctx, RoleAdmin)
	if err == nil {
		err = a.s.RemoveHost(ctx, who, r.Msg.Name)
	}
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.RemoveHostResponse{}), nil
}

func (a *api) RevokeHost(ctx context.Context, r *connect.Request[ksv1.RevokeHostRequest]) (*connect.Response[ksv1.RevokeHostResponse], error) {
	who, err := allow(ctx, RoleAdmin)
	if err == nil {
		err = a.s.RevokeHost(ctx, who, r.Msg.Name)
	}
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.RevokeHostResponse{}), nil
}

func hostMsg(h HostRecord) *ksv1.Host {
	return &ksv1.Host{
		Name: h.Name, Mode: h.Mode, Groups: h.Groups, Guardian: h.Guardian, Ek: h.EK, Policy: h.Policy,
		Revoked: h.Revoked, RevokedUnix: unix(h.RevokedAt), RegisteredUnix: unix(h.Registered),
		AttestedUnix: unix(h.Attested), HealthNotAfterUnix: unix(h.HealthNotAfter), LastFailure: h.LastFailure,
	}
}

func unix(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

func (a *api) ListHosts(ctx context.Context, r *connect.Request[ksv1.ListHostsRequest]) (*connect.Response[ksv1.ListHostsResponse], error) {
	if _, err := allow(ctx, RoleAdmin, RoleReviewer); err != nil {
		return nil, a.out(err)
	}
	hs, err := a.s.Hosts(ctx)
	if err != nil {
		return nil, a.out(err)
	}
	resp := &ksv1.ListHostsResponse{}
	for _, h := range hs {
		resp.Hosts = append(resp.Hosts, hostMsg(h))
	}
	return connect.NewResponse(resp), nil
}

// PolicyToProto and PolicyFromProto convert attestation policies.
func PolicyToProto(p verify.Policy) *ksv1.Policy {
	m := &ksv1.Policy{Name: p.Name, RequireSecureBoot: p.RequireSecureBoot}
	for _, c := range p.Classes {
		m.Classes = append(m.Classes, &ksv1.PCRClass{Name: c.Name, Pcrs: c.PCRs})
	}
	return m
}

// PolicyFromProto is the inverse of PolicyToProto.
func PolicyFromProto(m *ksv1.Policy) verify.Policy {
	p := verify.Policy{Name: m.GetName(), RequireSecureBoot: m.GetRequireSecureBoot()}
	for _, c := range m.GetClasses() {
		p.Classes = append(p.Classes, verify.PCRClass{Name: c.GetName(), PCRs: c.GetPcrs()})
	}
	return p
}

func (a *api) SetPolicy(ctx context.Context, r *connect.Request[ksv1.SetPolicyRequest]) (*connect.Response[ksv1.SetPolicyResponse], error) {
	who, err := allow(ctx, RoleAdmin)
	if err == nil {
		err = a.s.SetPolicy(ctx, who, PolicyFromProto(r.Msg.GetPolicy()))
	}
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.SetPolicyResponse{}), nil
}

func (a *api) ListPolicies(ctx context.Context, r *connect.Request[ksv1.ListPoliciesRequest]) (*connect.Response[ksv1.ListPoliciesResponse], error) {
	if _, err := allow(ctx, RoleAdmin, RoleReviewer); err != nil {
		return nil, a.out(err)
	}
	ps, err := a.s.Policies(ctx)
	if err != nil {
		return nil, a.out(err)
	}
	resp := &ksv1.ListPoliciesResponse{}
	for _, p := range ps {
		resp.Policies = append(resp.Policies, PolicyToProto(p))
	}
	return connect.NewResponse(resp), nil
}

func (a *api) SetVMPolicy(ctx context.Context, r *connect.Request[ksv1.SetVMPolicyRequest]) (*connect.Response[ksv1.SetVMPolicyResponse], error) {
	who, err := allow(ctx, RoleAdmin)
	if err == nil {
		p := r.Msg.GetPolicy()
		err = a.s.SetVMPolicy(ctx, who, VMPolicy{TPM: p.GetTpm(), Groups: p.GetGroups()}, r.Msg.Remove)
	}
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.SetVMPolicyResponse{}), nil
}

func (a *api) ListVMPolicies(ctx context.Context, r *connect.Request[ksv1.ListVMPoliciesRequest]) (*connect.Response[ksv1.ListVMPoliciesResponse], error) {
	if _, err := allow(ctx, RoleAdmin, RoleReviewer); err != nil {
		return nil, a.out(err)
	}
	ps, err := a.s.VMPolicies(ctx)
	if err != nil {
		return nil, a.out(err)
	}
	resp := &ksv1.ListVMPoliciesResponse{}
	for _, p := range ps {
		resp.Policies = append(resp.Policies, &ksv1.VMPolicy{Tpm: p.TPM, Groups: p.Groups})
	}
	return connect.NewResponse(resp), nil
}

func (a *api) IssueClient(ctx context.Context, r *connect.Request[ksv1.IssueClientRequest]) (*connect.Response[ksv1.IssueClientResponse], error) {
	who, err := allow(ctx, RoleAdmin)
	if err != nil {
		return nil, a.out(err)
	}
	role, err := ParseRole(r.Msg.Role)
	if err != nil {
		return nil, a.out(err)
	}
	pub, err := parsePub(r.Msg.PublicKey)
	if err != nil {
		return nil, a.out(err)
	}
	issued, err := a.s.IssueClient(ctx, who, r.Msg.Name, role, pub)
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.IssueClientResponse{Client: clientCert(issued)}), nil
}

func (a *api) AddMember(ctx context.Context, r *connect.Request[ksv1.AddMemberRequest]) (*connect.Response[ksv1.AddMemberResponse], error) {
	who, err := allow(ctx, RoleAdmin)
	if err != nil {
		return nil, a.out(err)
	}
	cluster, key, err := a.s.AddMember(ctx, who, r.Msg.Name, r.Msg.PeerUrls)
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.AddMemberResponse{InitialCluster: cluster, ServiceKey: key, CaCertificate: a.s.ca.Load().cert.Raw}), nil
}

func (a *api) Backup(ctx context.Context, r *connect.Request[ksv1.BackupRequest]) (*connect.Response[ksv1.BackupResponse], error) {
	who, err := allow(ctx, RoleAdmin)
	if err != nil {
		return nil, a.out(err)
	}
	b, err := a.s.Backup(ctx, who, r.Msg.Passphrase)
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.BackupResponse{Backup: b}), nil
}

// AuditToProto converts an audit record.
func AuditToProto(r AuditRecord) *ksv1.AuditRecord {
	return &ksv1.AuditRecord{
		Seq: r.Seq, TimeUnixNano: r.Time.UnixNano(), Node: r.Node, Event: r.Event, Actor: r.Actor, Host: r.Host, Tpm: r.TPM,
		Outcome: r.Outcome, Reason: r.Reason, RequestId: r.RequestID, Detail: r.Detail, PrevHash: r.Prev, Hash: r.Hash, Mac: r.MAC,
	}
}

func (a *api) GetAudit(ctx context.Context, r *connect.Request[ksv1.GetAuditRequest]) (*connect.Response[ksv1.GetAuditResponse], error) {
	if _, err := allow(ctx, RoleAdmin, RoleReviewer); err != nil {
		return nil, a.out(err)
	}
	recs, v, err := a.s.Audit(ctx, r.Msg.After, r.Msg.Verify)
	if err != nil {
		return nil, a.out(err)
	}
	resp := &ksv1.GetAuditResponse{}
	for _, rec := range recs {
		resp.Records = append(resp.Records, AuditToProto(rec))
	}
	if v != nil {
		resp.Verified, resp.FirstBad, resp.Problem = v.FirstBad == 0, v.FirstBad, v.Problem
	}
	return connect.NewResponse(resp), nil
}

func (a *api) Status(ctx context.Context, r *connect.Request[ksv1.StatusRequest]) (*connect.Response[ksv1.StatusResponse], error) {
	if _, err := allow(ctx, RoleAdmin, RoleReviewer); err != nil {
		return nil, a.out(err)
	}
	st, err := a.s.Status(ctx)
	if err != nil && st == nil {
		return nil, a.out(err)
	}
	resp := &ksv1.StatusResponse{
		Node: st.Node, Leader: st.Leader, Quorum: st.Quorum, HostsRegistered: uint32(st.HostsRegistered), HostsAttested: uint32(st.HostsAttested),
		ServiceKeyStorage: st.ServiceKeyStorage, ServiceKeyWeaker: st.ServiceKeyWeaker, FleetFingerprint: st.FleetFingerprint,
		AuditRecords: st.AuditRecords, Storage: st.Storage,
	}
	for _, m := range st.Members {
		resp.Members = append(resp.Members, &ksv1.Member{Name: m.Name, Id: m.ID, PeerUrls: m.PeerURLs, ClientUrls: m.ClientURLs,
			Leader: m.Leader, Reachable: m.Reachable, Error: m.Error, ApiUrl: m.APIURL})
	}
	for _, e := range st.Expiring {
		resp.Expiring = append(resp.Expiring, &ksv1.ExpiringCertificate{Host: e.Host, NotAfterUnix: e.NotAfter.Unix()})
	}
	return connect.NewResponse(resp), nil
}

func (a *api) GetFleetGuardian(ctx context.Context, r *connect.Request[ksv1.GetFleetGuardianRequest]) (*connect.Response[ksv1.GetFleetGuardianResponse], error) {
	if _, err := allow(ctx, RoleAdmin, RoleReviewer, RoleHost); err != nil {
		return nil, a.out(err)
	}
	g, certs, err := a.s.FleetGuardian(ctx)
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.GetFleetGuardianResponse{Certificates: certs, Fingerprint: g.Fingerprint()}), nil
}

func (a *api) BeginAttestation(ctx context.Context, r *connect.Request[ksv1.BeginAttestationRequest]) (*connect.Response[ksv1.BeginAttestationResponse], error) {
	who, err := allow(ctx, RoleHost)
	if err != nil {
		return nil, a.out(err)
	}
	m := r.Msg
	session, c, err := a.s.BeginAttestation(ctx, who, &verify.Begin{
		Mode: m.Mode, EKPublic: m.EkPublic, EKCertificate: m.EkCertificate, AKPublic: m.AkPublic,
		AKCreateData: m.AkCreateData, AKCreateAttestation: m.AkCreateAttestation, AKCreateSignature: m.AkCreateSignature,
	})
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.BeginAttestationResponse{Session: session, Nonce: c.Nonce, CredentialBlob: c.Credential, EncryptedSecret: c.EncryptedSecret}), nil
}

func (a *api) CompleteAttestation(ctx context.Context, r *connect.Request[ksv1.CompleteAttestationRequest]) (*connect.Response[ksv1.CompleteAttestationResponse], error) {
	who, err := allow(ctx, RoleHost)
	if err != nil {
		return nil, a.out(err)
	}
	m := r.Msg
	cert, err := a.s.CompleteAttestation(ctx, who, m.Session, &verify.Evidence{
		Signature: m.Signature, ActivatedSecret: m.ActivatedSecret, Quote: m.Quote, QuoteSignature: m.QuoteSignature,
		PCRs: m.Pcrs, PCRBank: uint16(m.PcrBank), EventLog: m.EventLog,
	})
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.CompleteAttestationResponse{HealthCertificate: cert.Raw, NotAfterUnix: cert.NotAfter.Unix()}), nil
}

func (a *api) ReleaseKey(ctx context.Context, r *connect.Request[ksv1.ReleaseKeyRequest]) (*connect.Response[ksv1.ReleaseKeyResponse], error) {
	who, err := allow(ctx, RoleHost)
	if err != nil {
		return nil, a.out(err)
	}
	m := r.Msg
	kem, err := hpke.NewKEM(uint16(m.RecipientKem))
	if err != nil {
		return nil, a.out(errdefs.Wrap(errdefs.ErrInvalidArgument, err, "one-time key's KEM 0x%04x", m.RecipientKem))
	}
	pub, err := kem.NewPublicKey(m.RecipientPublicKey)
	if err != nil {
		return nil, a.out(errdefs.Wrap(errdefs.ErrInvalidArgument, err, "one-time public key"))
	}
	if m.RequestId == "" {
		return nil, a.out(errdefs.New(errdefs.ErrInvalidArgument, "a release needs a request ID"))
	}
	rel, err := a.s.ReleaseKey(ctx, who, m.Protector, m.HealthCertificate, pub, m.RequestId)
	if err != nil {
		return nil, a.out(err)
	}
	return connect.NewResponse(&ksv1.ReleaseKeyResponse{SealedKey: rel.Sealed, Tpm: rel.TPM.String(), FleetFingerprint: rel.Fleet, AuditSeq: rel.AuditSeq}), nil
}
