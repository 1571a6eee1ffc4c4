package keyservice

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"vtpm/internal/errdefs"
)

// Audit events.
const (
	EventInit     = "init"
	EventRestore  = "restore"
	EventRegister = "register"
	EventRemove   = "remove"
	EventRevoke   = "revoke"
	EventAttest   = "attest"
	EventRelease  = "release"
	EventDeny     = "deny"
	EventPolicy   = "policy"
	EventClient   = "client"
	EventMember   = "member"
)

// AuditRecord is one entry of the hash-chained audit log. Hash is
// SHA-256 over the record's JSON with Hash and MAC empty; Prev is the
// previous record's Hash (32 zero bytes for the first), so editing,
// removing or reordering a record breaks the chain at that record. MAC is
// HMAC-SHA256 of Hash under a key derived from the service key, so that
// rewriting the chain from a record on needs the service key too.
type AuditRecord struct {
	Seq       uint64    `json:"seq"`
	Time      time.Time `json:"time"`
	Node      string    `json:"node"`
	Event     string    `json:"event"`
	Actor     string    `json:"actor,omitempty"`
	Host      string    `json:"host,omitempty"`
	TPM       string    `json:"tpm,omitempty"`
	Outcome   string    `json:"outcome"` // ok or denied
	Reason    string    `json:"reason,omitempty"`
	RequestID string    `json:"request_id,omitempty"`
	Detail    string    `json:"detail,omitempty"`
	Prev      []byte    `json:"prev"`
	Hash      []byte    `json:"hash,omitempty"`
	MAC       []byte    `json:"mac,omitempty"`
}

type auditHead struct {
	Seq  uint64 `json:"seq"`
	Hash []byte `json:"hash"`
}

func (r *AuditRecord) computeHash() []byte {
	c := *r
	c.Hash, c.MAC = nil, nil
	b, err := json.Marshal(&c)
	if err != nil {
		panic(err)
	}
	sum := sha256.Sum256(b)
	return sum[:]
}

func auditKey(seq uint64) string { return fmt.Sprintf("%s%016d", keyAuditRec, seq) }

// appendAudit appends r to the chain in one etcd transaction that
// compares the head, so concurrent nodes never fork the chain. A record
// with a request ID already in the log is not appended again: dup is true
// and seq is the earlier record's.
func (s *Service) appendAudit(ctx context.Context, r AuditRecord) (seq uint64, dup bool, err error) {
	r.Node = s.cfg.Name
	for attempt := 0; ; attempt++ {
		var head auditHead
		found, rev, err := s.st.getJSON(ctx, keyAuditHead, &head)
		if err != nil {
			return 0, false, err
		}
		if !found {
			head.Hash = make([]byte, sha256.Size)
		}
		rec := r
		rec.Seq = head.Seq + 1
		rec.Time = time.Now().UTC()
		rec.Prev = head.Hash
		rec.Hash = rec.computeHash()
		rec.MAC = s.key.auditMAC(rec.Hash)
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(keyAuditHead), "=", rev)}
		then := []clientv3.Op{
			clientv3.OpPut(keyAuditHead, mustJSON(auditHead{Seq: rec.Seq, Hash: rec.Hash})),
			clientv3.OpPut(auditKey(rec.Seq), mustJSON(&rec)),
		}
		var els []clientv3.Op
		if r.RequestID != "" {
			req := keyAuditReq + r.RequestID
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(req), "=", 0))
			then = append(then, clientv3.OpPut(req, strconv.FormatUint(rec.Seq, 10)))
			els = append(els, clientv3.OpGet(req))
		}
		resp, err := s.st.txn(ctx, "append to the audit log", cmps, then, els...)
		if err != nil {
			return 0, false, err
		}
		if resp.Succeeded {
			return rec.Seq, false, nil
		}
		if len(els) > 0 {
			if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
				seq, _ := strconv.ParseUint(string(kvs[0].Value), 10, 64)
				return seq, true, nil
			}
		}
		if attempt > 1000 {
			return 0, false, errdefs.New(errdefs.ErrUnavailable, "the audit log's head kept moving; try again")
		}
	}
}

// auditRecords returns the records with seq > after, in order.
func (s *Service) auditRecords(ctx context.Context, after uint64) ([]AuditRecord, error) {
	var resp *clientv3.GetResponse
	err := s.st.op(ctx, "read the audit log", func(ctx context.Context) error {
		var err error
		resp, err = s.st.cli.Get(ctx, auditKey(after+1), clientv3.WithRange(clientv3.GetPrefixRangeEnd(keyAuditRec)))
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]AuditRecord, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var r AuditRecord
		if err := json.Unmarshal(kv.Value, &r); err != nil {
			// Kept, so that Verify names it: an unreadable record breaks the chain.
			r = AuditRecord{Detail: "unreadable: " + err.Error()}
			fmt.Sscanf(string(kv.Key[len(keyAuditRec):]), "%d", &r.Seq)
		}
		out = append(out, r)
	}
	return out, nil
}

// AuditVerdict is the result of checking the audit chain.
type AuditVerdict struct {
	Records  uint64
	FirstBad uint64 // 0 when the chain holds
	Problem  string
}

// verifyAudit recomputes the whole chain and names the first record that
// breaks it.
func (s *Service) verifyAudit(ctx context.Context) (AuditVerdict, error) {
	recs, err := s.auditRecords(ctx, 0)
	if err != nil {
		return AuditVerdict{}, err
	}
	var head auditHead
	found, _, err := s.st.getJSON(ctx, keyAuditHead, &head)
	if err != nil {
		return AuditVerdict{}, err
	}
	return checkChain(recs, head, found, s.key.auditMAC), nil
}

// checkChain checks recs against each other, the head and, when mac is
// not nil, each record's MAC.
func checkChain(recs []AuditRecord, head auditHead, headFound bool, mac func([]byte) []byte) AuditVerdict {
	v := AuditVerdict{Records: uint64(len(recs))}
	prev := make([]byte, sha256.Size)
	for i, r := range recs {
		want := uint64(i + 1)
		bad := func(format string, a ...any) AuditVerdict {
			v.FirstBad, v.Problem = want, fmt.Sprintf("record %d: ", want)+fmt.Sprintf(format, a...)
			return v
		}
		switch {
		case r.Seq != want:
			return bad("missing; the next record is %d", r.Seq)
		case !bytes.Equal(r.Prev, prev):
			return bad("does not follow record %d (its previous hash differs)", want-1)
		case !bytes.Equal(r.computeHash(), r.Hash):
			return bad("its hash does not match its contents (edited)")
		case mac != nil && !hmac.Equal(mac(r.Hash), r.MAC):
			return bad("its MAC does not verify (written without the service key)")
		}
		prev = r.Hash
	}
	switch {
	case !headFound && len(recs) > 0:
		v.FirstBad, v.Problem = 1, "the log's head is missing"
	case headFound && head.Seq != uint64(len(recs)):
		v.FirstBad, v.Problem = uint64(len(recs))+1, fmt.Sprintf("record %d: missing (the head says %d records)", len(recs)+1, head.Seq)
	case headFound && !bytes.Equal(head.Hash, prev):
		v.FirstBad, v.Problem = uint64(len(recs)), fmt.Sprintf("record %d: the head's hash differs (last record replaced)", len(recs))
	}
	return v
}
