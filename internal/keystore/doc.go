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
//	dir/generations/<uuid> last generation seen per blob of one TPM (two slots)
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
// # Generation records
//
// A TPM's generation record is updated in place, so that a vTPM process
// can keep recording after it has dropped the privileges the keystore
// needs (Generations.Pin keeps the file open). The file holds two slots of
// 1024 bytes; each slot is
//
//	offset size field
//	     0    4 magic "VTGN"
//	     4    1 format version (1)
//	     5   12 GCM nonce (random)
//	    17  991 ciphertext: sequence number (8, big-endian), count (2), per
//	            blob name length (1), name, generation (8); zero padding
//	  1008   16 GCM tag
//
// under AES-256-GCM with a key of that record alone:
// HKDF-SHA256(HKDF-SHA256(master, "vtpm keystore generations v1"),
// "vtpm generation record v1 " + UUID). The additional data is magic,
// version, "generations", 0, the UUID, 0 and the slot index, so a slot
// moved to another slot or another TPM's record does not decrypt. The
// newest valid slot (highest sequence number) is the record. A write reads
// it, raises it, and puts it with the next sequence number into the other
// slot (pwrite, fdatasync): the slot being written never holds the newest
// copy, so a crash mid-write leaves a torn slot that is ignored (and
// logged) and the previous record. The file is created whole by rename,
// so it always has a valid slot; one with none is ErrCorrupt, never read
// as "nothing recorded".
//
// The same record holds, under the name "/protector" (no blob name has a
// slash), the highest version of the TPM's key protector seen, so that an
// older protector is refused like older state.
//
// # Concurrency
//
// Many vTPM processes may use one keystore at once. Every replacement of a
// record (a temp file, fsync, rename, fsync of the directory) and the
// creation of a generation record happen under an exclusive flock on
// dir/.lock; readers need no lock because such a record is only ever
// replaced by rename. Generation records are read under a shared and
// updated under an exclusive flock on the record file itself, which a
// pinned record can take without access to the directory, so
// Generations.Record and Pinned.Record are serialised across processes.
//
// # Errors
//
// Every failure to create, open or write the keystore is one error naming
// the cause and the fix, matching one of ErrPermission (wrong owner or
// mode, unreadable files, a host TPM the user may not open), ErrCorrupt
// (a damaged record or master key file), ErrHostTPMChanged (the master key
// is sealed to a TPM that has since been cleared or replaced: the SRK's
// name differs, or TPM2_Load fails its integrity check) or
// ErrHostTPMMissing (sealed to a TPM that is not reachable, or an
// explicitly configured TPM that does not answer; an explicit setting
// never falls back to file protection).
//
// # Cost
//
// Opening a file-protected keystore takes about 20 µs. Opening one sealed
// to a local swtpm over TCP takes about 2 ms (CreatePrimary 0.6 ms, salted
// session and Unseal 0.6 ms, the rest Load, Flush and the connection), and
// about 1.3 ms with a persistent SRK. A discrete hardware TPM is much
// slower at key derivation and ECDH (tens of milliseconds), so a process
// that must start quickly should be handed keys by one that opened the
// keystore, rather than open it itself.
package keystore
