// Package seal stores libtpms state blobs ("permall", "volatilestate",
// "savestate") encrypted and authenticated with AES-256-GCM under a per-TPM
// 32-byte data key (DEK), with crash-safe writes, a previous copy of every
// blob, rollback detection and swtpm-compatible directory locking.
//
// # Sealed file format (version 1)
//
// All integers are big-endian.
//
//	offset size field
//	     0    8 magic "VTPMSEAL"
//	     8    2 format version (1)
//	    10    1 blob type: 1 permall, 2 volatilestate, 3 savestate
//	    11    1 reserved, 0
//	    12    8 generation (>= 1, grows by at least one per write of a type)
//	    20   16 TPM UUID
//	    36    4 plaintext length N
//	    40   12 GCM nonce (random)
//	    52  N+16 ciphertext and GCM tag
//
// The 52-byte header is the GCM additional data, so the magic, version, type,
// generation, UUID and length are authenticated along with the state. The
// AES key is HKDF-SHA256(DEK, info "vtpm seal v1"), which keeps the DEK free
// for deriving other keys (e.g. for migration).
//
// A file is checked in this order: magic, version, size (short files are
// "truncated"), then GCM authentication against the file's own header, and
// only then the header's UUID and type against what the caller expected.
// Checking UUID and type after authentication means a mismatch there is a
// genuine blob put in the wrong place, not a damaged header.
//
// # Directory layout
//
//	D/.lock                   POSIX fcntl write lock, shared with swtpm
//	D/vtpm-state.json         {"format":1,"uuid":"..."}, created on first use
//	D/<name>.sealed           newest copy
//	D/<name>.sealed.prev      previous generation
//	D/<name>.sealed.tmp       new copy being written (never read)
//	D/<name>.sealed.prev.tmp  link to the newest copy being made the previous one
//
// # Crash safety
//
// A write of generation g+1 over a verifiable current copy g runs these steps:
//
//  1. write <name>.sealed.tmp and fsync it;
//  2. hard-link <name>.sealed to <name>.sealed.prev.tmp (or copy and fsync it
//     where the file system has no hard links);
//  3. rename <name>.sealed.prev.tmp over <name>.sealed.prev;
//  4. rename <name>.sealed.tmp over <name>.sealed;
//  5. fsync the directory;
//  6. record g+1 as the last generation seen (Generations.Record).
//
// <name>.sealed is never absent and never partial: before step 4 it is copy g,
// after it copy g+1, and rename is atomic. Step 1's fsync makes the data of
// g+1 durable before any rename can expose it, and steps 2–3 only add names
// for the durable copy g, so whatever subset of renames reaches the disk
// before a crash, <name>.sealed holds g or g+1 and <name>.sealed.prev holds a
// complete older copy. Step 6 comes after step 5, so the recorded generation
// never exceeds one that is durable on disk, and a crash never makes a valid
// newest copy look like a rollback.
//
// If the current copy does not verify, steps 2–3 are skipped: the previous
// copy, the last good one, is kept rather than replaced by a damaged file.
//
// # Rollback
//
// The last generation seen per TPM and blob type is kept outside the state
// directory (Generations). Loading a copy older than that fails with
// ErrRollback unless Options.AllowRollback is set. Falling back to the
// previous copy because the newest does not verify is allowed one generation
// back, with a warning: keeping that copy is the point of the .prev file.
package seal
