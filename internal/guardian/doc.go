// Package guardian implements guardians — named key sets that can unwrap a
// TPM's data key (DEK) — and key protectors, which hold a DEK wrapped with
// HPKE (RFC 9180) to each guardian allowed to open it, signed by an owner
// guardian.
//
// # Guardians
//
// A guardian has an ECDSA P-256 signing key and an HPKE encryption key, each
// with an X.509 certificate naming the guardian (a host's local guardian is
// named "host:" followed by the host name):
//
//   - The signing certificate is self-signed: subject CN=<name>, a CA
//     certificate (path length 0) with key usage digitalSignature and
//     keyCertSign, valid until 9999-12-31 (RFC 5280 "no expiration").
//     The guardian's fingerprint — the lowercase hex SHA-256 of this
//     certificate's DER — identifies it everywhere.
//   - The encryption certificate is issued by the signing key: subject
//     CN=<name>, OU=vtpm guardian encryption key, key usage keyAgreement.
//     Its HPKE KEM id and public key (the RFC 9180 SerializePublicKey
//     output) are in a critical extension, defined below. For DHKEM(P-256)
//     the SubjectPublicKeyInfo holds the same P-256 key; X.509 as Go writes
//     it has no encoding for the MLKEM768-X25519 hybrid, so there it repeats
//     the signing key as a placeholder and the extension is authoritative.
//
// The default KEM is MLKEM768-X25519 (0x647a). DHKEM(P-256) (0x0010) is for
// keys held by a TPM or HSM. Every row uses HKDF-SHA256 and AES-256-GCM.
//
// The HPKE private key is not stored: it is derived from the ECDSA private
// key d (32-byte big-endian) as
//
//	seed = HKDF-SHA256(secret=d, salt=none, info="vtpm guardian hpke v1" || uint16be(KEM id), 32 bytes)
//	key  = KEM.DeriveKeyPair(seed)        (RFC 9180 DeriveKeyPair)
//
// so one private key — the one PKCS#12 and PKCS#8 know how to carry — holds
// the whole guardian. Every load re-derives the HPKE key and checks it against
// the encryption certificate.
//
// A guardian whose keys live in a TPM or HSM (NewExternal) has a DHKEM(P-256)
// encryption key of its own, used through ecdh.KeyExchanger, and signs
// through crypto.Signer. Its keys never leave the device: Marshal and
// ExportPKCS12 refuse it; its certificates are stored instead and the keys
// re-attached with Attach.
//
// # Certificate extension
//
// The extension's OID is 1.3.6.1.4.1.99999.1.1 ("vtpm guardian HPKE public
// key") under the arc 1.3.6.1.4.1.99999, which stands for vtpm's IANA Private
// Enterprise Number. The project has not registered one yet; the number is
// a placeholder to be replaced, before the format is relied on, by the one
// IANA assigns. Its value is DER:
//
//	HPKEPublicKey ::= SEQUENCE {
//	    kem        INTEGER,       -- HPKE KEM id
//	    publicKey  OCTET STRING   -- SerializePublicKey(pk)
//	}
//
// # Encodings of a guardian
//
//   - Marshal / Parse (keystore): PEM blocks CERTIFICATE (signing),
//     CERTIFICATE (encryption) and, for a private guardian, PRIVATE KEY
//     (PKCS#8 ECDSA). Certificates may come in either order.
//   - ExportCertificates / ParseCertificates: the two CERTIFICATE blocks
//     only. This is all another host needs to grant the guardian.
//   - ExportPKCS12 / ImportPKCS12: a password-protected PKCS#12 file
//     (PBES2, PBKDF2-HMAC-SHA-256, AES-256-CBC, HMAC-SHA-256 MAC) with one
//     key bag (the ECDSA key) and two certificate bags. OpenSSL 1.1.1 and
//     later read it ("openssl pkcs12 -in F -nodes" prints the key and both
//     certificates, and that output is itself accepted by Parse), and
//     files re-exported by "openssl pkcs12 -export" import.
//
// Importing never decides what to do with a guardian that is already known;
// callers compare Fingerprint values.
//
// # Key protector format (version 2)
//
// A protector is stored beside the sealed TPM state as JSON (binary values
// base64, as encoding/json writes []byte):
//
//	{
//	  "format": 2,
//	  "version": <protector version, >= 1>,
//	  "tpm": "<TPM UUID>",
//	  "owner": {"name": "...", "fingerprint": "<hex>", "cert": "<signing cert DER>"},
//	  "key_check": "<32 bytes>",
//	  "rows": [{
//	    "name": "...", "subject": "CN=...", "fingerprint": "<hex>", "kem": 25722,
//	    "sign_cert": "<DER>", "enc_cert": "<DER>",
//	    "wrap": "<HPKE enc || ciphertext of the DEK>"
//	  }, ...],
//	  "signature": "<ASN.1 ECDSA P-256 signature>"
//	}
//
// Each row's wrap is hpke.Seal(guardian's HPKE key, HKDF-SHA256, AES-256-GCM,
// info, DEK) with
//
//	info = "vtpm protector wrap v1" || 0x00 || uint16be(1) || TPM UUID (16)
//	       || owner fingerprint (32 raw bytes) || row fingerprint (32 raw bytes)
//
// so a row cannot be moved to another TPM, another guardian's row, or a
// protector with another owner. key_check is HKDF-SHA256(secret=DEK,
// salt=TPM UUID, info="vtpm protector key check v1", 32 bytes): Grant
// refuses a DEK that fails it, and Open refuses a row that unwraps to one.
//
// The signature is ECDSA over SHA-256 of the canonical encoding
//
//	"vtpm protector v1" || 0x00 || uint16be(2) || TPM UUID (16)
//	|| uint64be(version)
//	|| lp(owner cert DER) || lp(key_check) || uint32be(row count)
//	|| for each row in order: lp(sign_cert) || lp(enc_cert) || lp(wrap)
//
// where lp(x) is uint32be(len(x)) || x.
//
// The version is 1 for a new protector and raised by every Grant, Revoke
// and Rekey, so of two protectors of one TPM signed by its owner the newer
// is the one with the higher version; a host records the highest it has
// seen and can refuse an older copy, as it refuses older state.
//
// Format 1, written before versions existed, has no "version" field and
// signs the same encoding with uint16be(1) and without the version. It is
// read as version 0, written back unchanged, and becomes format 2 with its
// first change. Rows are the same in both formats (their wrap info keeps
// uint16be(1)), so they stay valid across the upgrade. Names, subjects and fingerprints are
// not signed directly: ParseProtector checks them against the certificates,
// which are. It also checks each row's certificates belong together, that no
// guardian has two rows, and that the owner has a row. A protector edited
// outside vtpm — a row removed, added, replaced or reordered, a field
// changed, the owner swapped — fails with ErrTampered.
//
// The owner signature proves only that the protector's owner wrote it.
// Someone with write access to the bundle can replace the protector with
// one of their own, owned by their guardian; rows copied from the original
// then no longer open (the wrap binds the owner), but a caller that knows
// which owner to expect should also compare Owner().Fingerprint().
//
// Revoking a row does not change the DEK: a guardian that opened the
// protector before may have kept it, and a copy of the protector saved
// before the revocation still opens. Rekey makes the protector for a new
// DEK (the same owner and guardians, less the revoked ones, the next
// version); the caller re-seals the state under the new DEK.
//
// # Migration key
//
// MigrationKey(DEK) = HKDF-SHA256(secret=DEK, salt=none,
// info="vtpm migration key v1", 32 bytes), distinct from the sealing key
// ("vtpm seal v1") and the key check.
package guardian
