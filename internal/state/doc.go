// Package state owns a TPM state directory: the format its state is kept in
// (vtpm's sealed state, or swtpm 0.7.1's files), its lock, which of its
// files are TPM state, opening it for libtpms (sealed state through the
// host's key broker), removing the state, and moving it aside into a backup.
//
// A directory is in one of two formats. Sealed state (internal/seal) is
// marked by its identity file, vtpm-state.json, and is opened with the data
// key the key broker (internal/keybroker, through [Keys]) unwraps from the
// key protector beside it. The key broker sits on this package: it takes
// the directory's lock to create a TPM's key, and moves the state aside
// with [MoveAside] when a policy replaces a TPM whose key is gone. swtpm's state (internal/swtpm/statefile) is tpm2-00.permall
// and its siblings, optionally encrypted with an swtpm --key. Both formats
// take the same POSIX lock on the directory's .lock file, the one swtpm
// takes, so any two TPM processes on one directory exclude each other.
//
// The format of a directory is chosen once, by [Choose], the same way by
// every caller: the TPM process, manufacture and swtpm_setup. A user (or a
// test) that needs swtpm's files asks for them explicitly with --tpmstate
// format=swtpm or $VTPM_STATE_FORMAT ([ChooseExplicit]); the request
// decides for a new directory, and a directory that holds the other format
// is refused rather than given a second TPM.
package state
