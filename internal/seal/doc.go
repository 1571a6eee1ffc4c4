// Package seal stores libtpms state blobs ("permall", "volatilestate",
// "savestate") encrypted and authenticated with AES-256-GCM under a per-TPM
// 32-byte data key (DEK), in two slot files per blob written alternately in
// place (one fdatasync per write, a complete copy at every instant), with
// rollback detection and swtpm-compatible directory locking.
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
//	D/.lock                    POSIX fcntl write lock, shared with swtpm
//	D/vtpm-state.json          {"format":1,"uuid":"..."}, created on first use
//	D/<name>.a.sealed          slot a: one copy of the blob
//	D/<name>.b.sealed          slot b: the other copy
//	D/<name>.[ab].sealed.tmp   a slot being created (never read)
//
// The two slots are peers: neither name means "newest". Which one holds
// the newest copy is decided by the generation in the files, so the names
// say only that there are two copies and that both are sealed files.
//
// # Writing
//
// A write of generation g+1 goes into the slot that does not hold the
// newest verified copy (generation g): the other slot holds g-1, or
// nothing, or a copy that does not verify. If that slot exists, the write
// is, on the same file:
//
//  1. pwrite the whole sealed record at offset 0;
//  2. ftruncate the file to the record's length;
//  3. fdatasync it.
//
// If the slot does not exist yet (the first two writes of a blob, and the
// first after Delete), it is created whole instead: write
// <slot>.tmp and fsync it, rename it to the slot's name, fsync the
// directory. A slot file therefore never holds a partial first copy, and
// once it exists its directory entry and inode are durable, so the
// fdatasync of step 3 (which flushes the data and the file's size, not
// its timestamps) is all an in-place write needs.
//
// Store returns after step 3 (or the directory fsync): the new generation
// is durable. It then hands the generation to the Store's recorder, a
// goroutine that calls Generations.Record with the newest generation
// handed over per blob, coalescing those that arrived while it was busy
// (Record is monotonic). Close records whatever is still pending.
//
// A write that fails leaves the Store's choice of slot as it was, so the
// next write retries the same slot and never the one holding the newest
// copy, even if the failed write's data looks complete in the page cache.
// Delete removes both slots (and any legacy files) and fsyncs the
// directory only if it removed something.
//
// # Crash safety
//
// The slot holding generation g is not written while g is the newest, so
// whatever a crash does to the slot being written, the other slot still
// holds a complete copy of g, durable since its own write returned. A
// crash during steps 1–3 can leave the written slot with the new record,
// the old one, or any mix of their blocks and sizes; a mix fails GCM
// authentication (or the header's length check), and a read takes the
// other slot. A crash during a slot's creation leaves at most an unread
// .tmp file, or (power loss before the directory fsync) no slot. So at
// every instant at least one slot verifies, and a read returns g or, if
// the write completed, g+1.
//
// A read verifies every copy and takes the newest generation. A copy that
// exists and does not verify is logged as a warning naming the file: it
// is expected after a crash in mid-write, but it is also what damage
// looks like, so it is never skipped silently. The next write goes into
// it, keeping the good copy.
//
// A crash loses the generations handed to the recorder and not yet
// recorded. The record then lags the disk, which only weakens rollback
// detection by the generations written since the last record. It never
// makes genuine state look like a rollback: a generation is handed over
// only once it is durable. A Load that finds a generation newer than the
// record fsyncs that file (the crash may have come before its fdatasync)
// and then records it.
//
// # Layout before slots
//
// Earlier builds kept <name>.sealed (newest, replaced by rename) and
// <name>.sealed.prev (the copy it replaced), with .tmp files while
// writing. Reads look at those files too, as further copies. The first
// write of a blob in a Store migrates them: <name>.sealed is renamed to
// slot a and <name>.sealed.prev to slot b (each only if the slot does not
// exist), the .tmp files are removed and the directory fsynced, before the
// write itself. A crash between these renames loses nothing, because a
// rename is atomic and reads look at both names.
//
// # Rollback
//
// The last generation seen per TPM and blob type is kept outside the state
// directory (Generations). Loading a copy older than that fails with
// ErrRollback unless Options.AllowRollback is set. A copy that does not
// verify is taken for the slot a crash tore in the middle of a write only
// when nothing says otherwise; then the newest copy that verifies is used,
// with a warning, which is the point of keeping two. By the crash-safety
// argument above, such a crash never leaves the newest verified copy older
// than the record, so a damaged copy beside an older one means the newest
// copy was damaged after it was written completely; and a copy whose
// header names another TPM is no torn write either. Both refuse the load
// with a *DamageError naming the file and the reasons, changing nothing;
// with AllowRollback the damaged file is renamed aside
// (<slot>.damaged-<time>) so that no write goes over it. A slot that is
// missing is no crash state (both exist once a blob has been written
// twice), nor are two intact copies older than the record. A copy this
// process may not read or write fails the load with a permission error
// naming it, rather than being skipped.
//
// The sealing key is derived into locked memory (package secret) and wiped
// by Close; the AES key schedule crypto/aes keeps for the AEAD is its own
// heap copy.
package seal
