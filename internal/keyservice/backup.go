package keyservice

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/crypto/scrypt"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
)

// A backup is the whole service state — every key under the prefix, the
// sealed values opened — encrypted under a passphrase:
//
//	{"format": 1, "kdf": "scrypt", "n": 32768, "r": 8, "p": 1,
//	 "salt": …, "nonce": …, "ciphertext": AES-256-GCM(plain, AD = "vtpm keyservice backup v1")}
//
// Restore re-seals the secrets under the restoring cluster's service key,
// so a backup restores onto wiped nodes with new service keys.
const backupFormat = 1

const backupAD = "vtpm keyservice backup v1"

type backupFile struct {
	Format     int    `json:"format"`
	KDF        string `json:"kdf"`
	N          int    `json:"n"`
	R          int    `json:"r"`
	P          int    `json:"p"`
	Salt       []byte `json:"salt"`
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ciphertext"`
}

type backupPlain struct {
	Created time.Time         `json:"created"`
	KVs     map[string][]byte `json:"kvs"`
	CAKey   []byte            `json:"ca_key"` // PKCS#8
	Fleet   []byte            `json:"fleet"`  // the fleet guardian's PEM, private key included
}

func backupAEAD(passphrase string, salt []byte, n, r, p int) (cipher.AEAD, error) {
	if len(passphrase) < 8 {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "the backup passphrase must have at least 8 characters")
	}
	key, err := scrypt.Key([]byte(passphrase), salt, n, r, p, 32)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Backup returns the whole service state encrypted under passphrase.
func (s *Service) Backup(ctx context.Context, who Identity, passphrase string) ([]byte, error) {
	var resp *clientv3.GetResponse
	err := s.st.op(ctx, "read the service state", func(ctx context.Context) error {
		var err error
		resp, err = s.st.cli.Get(ctx, prefix, clientv3.WithPrefix())
		return err
	})
	if err != nil {
		return nil, err
	}
	plain := backupPlain{Created: time.Now().UTC(), KVs: map[string][]byte{}}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		switch {
		case k == keyCA:
			var rec caRecord
			if err := json.Unmarshal(kv.Value, &rec); err != nil {
				return nil, err
			}
			if plain.CAKey, err = s.key.open(keyCA, rec.SealedKey); err != nil {
				return nil, err
			}
		case k == keyFleet:
			var rec fleetRecord
			if err := json.Unmarshal(kv.Value, &rec); err != nil {
				return nil, err
			}
			if plain.Fleet, err = s.key.open(keyFleet, rec.Sealed); err != nil {
				return nil, err
			}
		case k == keyCheck, strings.HasPrefix(k, keyNodes):
			continue // the restoring cluster's own
		}
		plain.KVs[k] = kv.Value
	}
	b, err := json.Marshal(plain)
	if err != nil {
		return nil, err
	}
	f := backupFile{Format: backupFormat, KDF: "scrypt", N: 1 << 15, R: 8, P: 1, Salt: make([]byte, 16)}
	rand.Read(f.Salt)
	aead, err := backupAEAD(passphrase, f.Salt, f.N, f.R, f.P)
	if err != nil {
		return nil, err
	}
	f.Nonce = make([]byte, aead.NonceSize())
	rand.Read(f.Nonce)
	f.Ciphertext = aead.Seal(nil, f.Nonce, b, []byte(backupAD))
	clear(b)
	if _, _, err := s.appendAudit(ctx, AuditRecord{Event: "backup", Actor: who.Name, Outcome: "ok", Detail: fmt.Sprintf("%d keys", len(plain.KVs))}); err != nil {
		return nil, err
	}
	return json.MarshalIndent(f, "", "\t")
}

// Restore replaces the state of a key service that has no fleet guardian
// (freshly started, or wiped) with a backup's, re-sealing its secrets under
// this cluster's service key. It is authorized by the init token.
func (s *Service) Restore(ctx context.Context, token, data []byte, passphrase string) (fleet string, keys int, err error) {
	if err := s.checkToken(token); err != nil {
		return "", 0, err
	}
	var f backupFile
	if err := json.Unmarshal(data, &f); err != nil || f.Format != backupFormat || f.KDF != "scrypt" {
		return "", 0, errdefs.New(errdefs.ErrInvalidArgument, "not a key service backup (format %d)", f.Format)
	}
	aead, err := backupAEAD(passphrase, f.Salt, f.N, f.R, f.P)
	if err != nil {
		return "", 0, err
	}
	b, err := aead.Open(nil, f.Nonce, f.Ciphertext, []byte(backupAD))
	if err != nil {
		return "", 0, errdefs.New(errdefs.ErrPermissionDenied, "the passphrase does not open the backup (or it was modified)")
	}
	defer clear(b)
	var plain backupPlain
	if err := json.Unmarshal(b, &plain); err != nil {
		return "", 0, errdefs.Wrap(errdefs.ErrDataLoss, err, "backup contents")
	}
	g, err := guardian.Parse(plain.Fleet)
	if err != nil {
		return "", 0, errdefs.Wrap(errdefs.ErrDataLoss, err, "the backup's fleet guardian")
	}
	var ca caRecord
	if err := json.Unmarshal(plain.KVs[keyCA], &ca); err != nil {
		return "", 0, errdefs.Wrap(errdefs.ErrDataLoss, err, "the backup's CA")
	}
	ca.SealedKey = s.key.seal(keyCA, plain.CAKey)
	var fr fleetRecord
	if err := json.Unmarshal(plain.KVs[keyFleet], &fr); err != nil {
		return "", 0, errdefs.Wrap(errdefs.ErrDataLoss, err, "the backup's fleet guardian record")
	}
	fr.Sealed = s.key.seal(keyFleet, plain.Fleet)
	plain.KVs[keyCA], plain.KVs[keyFleet] = []byte(mustJSON(ca)), []byte(mustJSON(fr))
	// The audit records keep their hashes; their MACs are this cluster's.
	for k, v := range plain.KVs {
		if !strings.HasPrefix(k, keyAuditRec) {
			continue
		}
		var r AuditRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return "", 0, errdefs.Wrap(errdefs.ErrDataLoss, err, "the backup's audit record %s", k)
		}
		r.MAC = s.key.auditMAC(r.Hash)
		plain.KVs[k] = []byte(mustJSON(&r))
	}

	// Only onto a service without a fleet guardian; the old state (CA,
	// audit, hosts) goes, the nodes and the key check stay. etcd bounds a
	// transaction's operations, so the state goes in batches and the fleet
	// guardian last, on the condition that there is still none.
	if _, _, err := s.FleetGuardian(ctx); err == nil {
		return "", 0, errdefs.New(errdefs.ErrFailedPrecondition, "this key service already has a fleet guardian; restore only onto new or wiped nodes")
	}
	var resp *clientv3.GetResponse
	if err := s.st.op(ctx, "read the service state", func(ctx context.Context) error {
		var err error
		resp, err = s.st.cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		return err
	}); err != nil {
		return "", 0, err
	}
	var ops []clientv3.Op
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		if k == keyCheck || strings.HasPrefix(k, keyNodes) {
			continue
		}
		if _, ok := plain.KVs[k]; !ok {
			ops = append(ops, clientv3.OpDelete(k))
		}
	}
	for k, v := range plain.KVs {
		if k != keyFleet {
			ops = append(ops, clientv3.OpPut(k, string(v)))
		}
	}
	for len(ops) > 0 {
		n := min(len(ops), 100)
		if _, err := s.st.txn(ctx, "restore the service state", nil, ops[:n]); err != nil {
			return "", 0, err
		}
		ops = ops[n:]
	}
	tr, err := s.st.txn(ctx, "restore the fleet guardian",
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(keyFleet), "=", 0)},
		[]clientv3.Op{clientv3.OpPut(keyFleet, string(plain.KVs[keyFleet]))})
	if err != nil {
		return "", 0, err
	}
	if !tr.Succeeded {
		return "", 0, errdefs.New(errdefs.ErrConflict, "a fleet guardian appeared during the restore; restore again onto wiped nodes")
	}
	if err := s.loadCA(ctx); err != nil {
		return "", 0, err
	}
	if _, _, err := s.appendAudit(ctx, AuditRecord{Event: EventRestore, Outcome: "ok", Detail: fmt.Sprintf("backup of %s, fleet guardian %s", plain.Created.Format(time.RFC3339), g)}); err != nil {
		return "", 0, err
	}
	return g.Fingerprint(), len(plain.KVs), nil
}
