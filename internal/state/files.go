package state

import (
	"strings"

	"vtpm/internal/seal"
)

// Files of a state directory that are not state blobs.
const (
	// LockFile is the lock both formats take (swtpm's name for it).
	LockFile = seal.LockName
	// IdentityFile holds a sealed TPM's UUID; it marks sealed state.
	IdentityFile = seal.StateFileName
	// ProtectorFile holds a sealed TPM's data key, wrapped for guardians
	// (the key broker reads and writes it).
	ProtectorFile = "protector.json"
	// PolicyFile holds a TPM's key policy; it is configuration, not state.
	PolicyFile = "policy.json"
)

// Blobs names the states libtpms stores, in swtpm's --print-states order.
var Blobs = seal.Names

// SwtpmFile is the name of swtpm's file for a blob (tpm2-00.permall).
func SwtpmFile(blob string) string { return "tpm2-00." + blob }

// IsStateFile reports whether a file name in a state directory is TPM
// state: a sealed blob in any of its copies (<blob>[.<copy>].sealed[.…]),
// an swtpm state file, or the sealed state's identity and key protector.
// The lock, the policy and backups are not.
func IsStateFile(name string) bool {
	if name == IdentityFile || name == ProtectorFile {
		return true
	}
	for _, n := range Blobs {
		if name == SwtpmFile(n) || (strings.HasPrefix(name, n+".") && strings.Contains(name, ".sealed")) {
			return true
		}
	}
	return false
}

// IsSealedBlob reports whether name is a file sealed state keeps a blob
// (or a copy being written) in, in either of its layouts.
func IsSealedBlob(name string) bool { return seal.IsBlobFile(name) }
