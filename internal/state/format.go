package state

import (
	"vtpm/internal/seal"
	"vtpm/internal/swtpm/statefile"
)

// Format names a state format.
type Format string

// State formats: vtpm's sealed state, or swtpm 0.7.1's files (optionally
// encrypted with an swtpm --key).
const (
	Sealed Format = "sealed"
	Swtpm  Format = "swtpm"
)

// Choose picks the format the state in dir is served in. Existing sealed
// state stays sealed (even when swtpmKey is set, as libvirt keeps passing
// --key after the state was imported); existing swtpm state keeps swtpm's
// format, so a libvirt VM keeps its TPM; a swtpm key asks for swtpm's
// format too; anything else is sealed.
//
// An empty dir stands for swtpm's linear state file (--tpmstate
// backend-uri=file://), which only swtpm's format has.
func Choose(dir string, swtpmKey bool) Format {
	switch {
	case dir == "":
		return Swtpm
	case seal.Exists(dir):
		return Sealed
	case swtpmKey || statefile.HasState(dir):
		return Swtpm
	}
	return Sealed
}

// IsSealed reports whether dir is sealed state: it has the identity file
// (vtpm-state.json), with or without blobs.
func IsSealed(dir string) bool { return seal.Exists(dir) }

// IsSwtpm reports whether dir holds swtpm's TPM 2 permanent state.
func IsSwtpm(dir string) bool { return statefile.HasState(dir) }

// HasState reports whether dir holds TPM state in either format: a sealed
// blob, or swtpm's permanent state. An identity or key protector without
// blobs is not a TPM yet.
func HasState(dir string) bool { return seal.HasBlobs(dir) || statefile.HasState(dir) }
