// Package keyfile exports and imports one TPM's data key (DEK) as a small
// passphrase-protected file, for backup or for moving a TPM to a host that
// shares no guardian with its source.
//
// # Format (version 1)
//
// All integers are big-endian. A file is exactly 120 bytes.
//
//	offset size field
//	     0    8 magic "VTPM-KEY"
//	     8    2 format version (1)
//	    10    4 Argon2id time (passes), 1..64
//	    14    4 Argon2id memory in KiB, 8×threads..4 GiB
//	    18    1 Argon2id threads (lanes), >= 1
//	    19    1 reserved, 0
//	    20   16 salt (random)
//	    36   12 AES-GCM nonce (random)
//	    48   72 AES-256-GCM ciphertext and tag of the 56-byte plaintext:
//	              16 TPM UUID
//	              32 DEK
//	               8 creation time, Unix seconds (signed)
//
// The AES key is Argon2id(passphrase, salt, time, memory, threads, 32 bytes).
// The 48-byte header is the GCM additional data, so the cost parameters, salt
// and version are authenticated with the key. The parameters are bounded
// before Argon2id runs, so a damaged file cannot demand unbounded memory.
//
// Decrypt reports a file that is not a key file (ErrNotKeyFile), a version it
// does not read (ErrUnsupportedVersion), a short file (ErrTruncated) and a
// failed authentication (ErrWrongPassphrase: "wrong passphrase, or the file
// was modified" — GCM cannot tell the two apart).
package keyfile
