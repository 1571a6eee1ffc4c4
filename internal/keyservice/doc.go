// Package keyservice is the key service's node: the fleet guardian, the
// host registry, attestation, key release and the hash-chained audit log,
// all kept in etcd, served over a Connect API with mutual TLS 1.3. Any node
// answers any request: every decision reads and writes etcd, so a node
// holds no state of its own but its service key, its etcd member's data and
// the TLS key it makes at each start.
//
// # Storage
//
// By default each node embeds an etcd member (go.etcd.io/etcd/server/v3
// embed) in <data dir>/etcd: one node alone, or 3 or 5 with the same
// --initial-cluster; join adds a member to a running cluster. With
// --etcd-endpoints a node uses an external etcd cluster instead. etcd logs
// warnings only; its ports are the configured loopback URLs.
//
// Everything lives under /vtpm-keyservice/:
//
//	service-key-check  HKDF-SHA256(service key, "vtpm keyservice key check v1"): a node with another key refuses to start
//	ca                 {"cert": DER, "sealed_key": seal(PKCS#8)}: the service CA
//	fleet              {"name", "fingerprint", "certs": PEM, "sealed": seal(guardian PEM with its private key)}
//	nodes/<name>       {"name", "api_url"}: every node's API URL, for client bundles
//	hosts/<name>       HostRecord: mode, groups, guardian certificates, EK, policy, revocation, current health and client certificates
//	policies/<name>    verify.Policy: accepted PCR values per hardware class
//	vms/<tpm uuid>     VMPolicy: the host groups that may run it; vms/default for every other TPM
//	audit/head         {"seq", "hash"}: the last record
//	audit/rec/<seq>    AuditRecord, seq as 16 decimal digits
//	audit/req/<id>     the seq of the record of a request ID (releases and denials)
//
// seal(x) is AES-256-GCM under HKDF-SHA256(service key, "vtpm keyservice
// seal v1") with a random 12-byte nonce prefixed and the etcd key as
// associated data, so a sealed value cannot be moved to another key.
//
// # The service key
//
// 32 random bytes, hex, in <data dir>/service.key (mode 0600): the first
// node of a cluster makes it; every other node is given the same file, or
// receives it from join over the authenticated API (AddMember, admin role).
// With --host-tpm (or $VTPM_HOST_TPM) a new node's key is instead sealed
// to the host's TPM (keystore.SealToHostTPM) in <data dir>/service.key.tpm
// and never written in clear. It seals the CA's and the fleet guardian's
// private keys and the attestation sessions, and derives the init token (HMAC-SHA256(key,
// "vtpm keyservice init token v1")) that authorizes Init and Restore, the
// two calls made before any client certificate exists: whoever can read a
// node's service key may bootstrap it. A key in a file is weaker than one
// sealed to the host's TPM; status says which it is.
//
// # Identities and roles
//
// The CA (ECDSA P-256, created by the first node in one etcd transaction)
// issues each node's TLS certificate at start, and client certificates
// whose organizational unit carries the role: "vtpm key service role
// admin" (changes hosts and policies, reads), "… reviewer" (reads hosts,
// policies, the audit log, status), "… host" (attests, asks for keys; its
// common name is the host's registered name). A client makes its key pair
// and sends only the public key; the private key never leaves it. A
// host's record keeps its client certificate's serial, so the certificate
// of a host removed and registered again under the same name is refused. TLS 1.3
// only; the client certificate is verified against the CA, and every call
// but Init and Restore checks the role.
//
// # Attestation
//
// BeginAttestation asks the host's mode's verify.Verifier for a challenge
// and returns it with a session: the challenge, the host, the mode and an
// expiry (5 minutes), sealed with AES-256-GCM under HKDF-SHA256(service
// key, "vtpm keyservice session v1") with the host's name as associated
// data — so CompleteAttestation may reach another node. A passed
// attestation gives a health certificate: issued by the CA over the host
// guardian's signing key, CN = host, OU = "vtpm health", valid for the
// configured lifetime (8 hours by default). The host record keeps its
// serial: a later attestation supersedes it, revocation voids it.
// Key mode (verify.KeyMode) checks an ECDSA signature by the registered
// guardian over verify.KeyModeMessage; TPM mode plugs in as another
// Verifier (Config.Verifiers).
//
// # Key release
//
// ReleaseKey checks, in order: the protector verifies (its owner's
// signature); the host is registered and not revoked; its health
// certificate is the CA's, for this host, unexpired and current; the VM's
// policy (vms/<tpm>, else vms/default) names a group the host is in, or no
// group; the protector has a row for the fleet guardian. Then the fleet
// guardian opens that row and the data key is HPKE-sealed (HKDF-SHA256,
// AES-256-GCM) to the one-time public key the host sent, with info
// ReleaseInfo(tpm, request ID). Each refusal is a *DenialError naming its
// reason. No key is returned unless its release is in the audit log.
//
// # Audit log
//
// Every registration, removal, revocation, attestation (passed or failed,
// with the reason), release, denial, policy change, client certificate,
// member, backup and restore appends an AuditRecord. A record's Hash is
// SHA-256 over its JSON with Hash and MAC empty; its Prev is the previous
// record's Hash (32 zero bytes for the first); its MAC is HMAC-SHA256 of
// Hash under HKDF-SHA256(service key, "vtpm keyservice audit v1"), so that
// whoever can write etcd but holds no service key cannot rewrite the chain
// from a record on (Restore re-MACs the records under its cluster's key).
// An append is one etcd transaction
// that compares the head's revision, writes the record and the new head,
// and — for a request with an ID — creates audit/req/<id> only if it does
// not exist: concurrent nodes never fork the chain, and a request retried
// on another node after its answer was lost is audited once (the retry
// gets the first record's seq). Verify recomputes every hash and link and
// names the first record that breaks the chain (edited, missing,
// reordered, or a head that does not match).
//
// # Without quorum
//
// Every etcd request has a deadline (Config.RequestTimeout, 3 s); a leader
// change within it is retried. An embedded member that has had no leader
// for a second fails the request at once. When etcd cannot answer, the request fails
// with an *UnavailableError naming every member and its state (probed
// with a 1 s deadline); clients then try the next node, and report every
// node they tried and its state. Running VMs hold their keys already; only
// new starts wait.
//
// # Backup
//
// Backup (admin) is the whole state under the prefix — but the key check
// and the nodes, which belong to the restoring cluster — with the CA's and
// the fleet guardian's private keys opened, as JSON encrypted with
// AES-256-GCM under scrypt(passphrase, N=32768, r=8, p=1). Restore (init
// token) writes it onto a service without a fleet guardian, re-sealing the
// secrets under that cluster's service key; the fleet guardian goes last,
// on the condition that there is still none. Clients' bundles keep
// working: the CA is the backup's, and nodes reissue their TLS
// certificates when it changes.
package keyservice
