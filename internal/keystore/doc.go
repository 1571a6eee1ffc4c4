// Package keystore is the host's protected keystore: guardian private keys,
// per-TPM records and the last generation seen of every TPM's state blobs
// (rollback protection), encrypted under one 32-byte master key.
//
// # Master key protection
//
// The master key is sealed to the host's hardware TPM when one is reachable
// (Options.HostTPM), otherwise it is kept in a protected file:
//
//   - TPM: master.tpm holds a KEYEDHASH sealed-data object created under the
//     TCG-standard ECC P-256 storage root key (SRK) of the owner hierarchy,
//     together with the SRK's name (which identifies the TPM's owner seed)
//     and the host TPM it was sealed through. Opening recreates the SRK
//     (CreatePrimary is deterministic for a given seed; a persistent SRK at
//     0x81000001 with the same name is used instead when present), loads the
//     object, unseals it over a salted, response-encrypted session, and
//     flushes everything. The object is fixedTPM|fixedParent with an empty
//     user auth: it cannot leave the TPM, and anyone who can send commands to
//     the TPM can unseal it, which on a host means root or the tss group.
//   - file: master.key holds the 32 raw bytes, mode 0600. Anyone with root
//     or a copy of the disk can read it; `vtpm doctor` reports this.
//
// # Layout
//
//	dir/                   0700, owned by the user running vtpm
//	dir/.lock              flock(2) lock taken by writers
//	dir/master.tpm         sealed master key (TPM protection), 0600
//	dir/master.key         raw master key (file protection), 0600
//	dir/<kind>/<name>      one encrypted record, 0600
//	dir/generations/<uuid> last generation seen per blob of one TPM (a record)
//
// # Record format (version 1)
//
//	offset size field
//	     0    4 magic "VTKS"
//	     4    1 format version (1)
//	     5   12 GCM nonce (random)
//	    17  N+16 ciphertext and GCM tag
//
// The AEAD is AES-256-GCM with the key HKDF-SHA256(master, info "vtpm
// keystore record v1"). The additional data is the 5-byte header followed
// by kind, a zero byte and name, so a record moved to another kind or name
// does not decrypt.
//
// # Concurrency
//
// Many vTPM processes may use one keystore at once. Every write (a temp
// file, fsync, rename, fsync of the directory) happens under an exclusive
// flock on dir/.lock, so read-modify-write updates such as
// Generations.Record are serialised across processes; readers need no lock
// because a record is only ever replaced by rename.
package keystore
