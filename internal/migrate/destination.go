package migrate

import (
	"context"

	"vtpm/internal/vm"
)

// Destination is the host a VM migrates to, as the source sees it: its
// host service over the API, or Local in process. Calls for one VM come in
// order: Preflight (any number of times), Prepare, Ready, then Commit or
// Abort.
type Destination interface {
	// Name is the destination host's name, for messages.
	Name() string
	// Preflight checks, without making anything, that the destination can
	// receive the VM spec describes. An error means the check could not
	// run; a refusal is Report.Refusal.
	Preflight(ctx context.Context, spec *vm.IncomingSpec) (*Report, error)
	// Prepare makes the VM's bundle (unregistered), starts its vTPM and
	// QEMU waiting for the migration, serves its disks over NBD and
	// listens for the stream, both over TLS admitting only certificates
	// issued under req.SourceCA.
	Prepare(ctx context.Context, req *PrepareRequest) (*Incoming, error)
	// Ready reports whether the destination still waits for the VM's
	// stream. The source asks before the switch-over, while it can still
	// resume the guest: after it, the source's disks are handed over.
	Ready(ctx context.Context, vm string) error
	// Commit runs and registers the VM once the stream has arrived.
	Commit(ctx context.Context, vm string) error
	// Abort stops what Prepare started and removes the bundle; it is
	// safe to call at any point, also when Prepare failed half-way.
	Abort(ctx context.Context, vm string) error
}

// Report is a destination's answer to a pre-flight check.
type Report struct {
	// Host is the destination's name; Guardian its guardian's public
	// certificates (PEM), which a grant admits to the TPM's protector.
	Host     string
	Guardian []byte
	// Refusal lists what stands in the way (a *vm.IncomingError); nil
	// when the destination is ready.
	Refusal error
	// NeedsGrant: among the problems, the TPM's key protector does not
	// admit the destination's guardian.
	NeedsGrant bool
}

// PrepareRequest asks a destination to get ready for a VM.
type PrepareRequest struct {
	Spec *vm.IncomingSpec
	// SourceCA is the source host's guardian signing certificate (PEM):
	// the destination's QEMU admits only certificates it issued.
	SourceCA []byte
}

// Incoming is where the destination waits for a VM.
type Incoming struct {
	// MigrateURI is QEMU's migration URI ("tcp:HOST:PORT").
	MigrateURI string
	// NBDHost and NBDPort are the destination's NBD server; Exports the
	// export name of each copied disk, by its index in vm.json.
	NBDHost string
	NBDPort string
	Exports map[int]string
	// CA is the destination's guardian signing certificate (PEM), which
	// issued the certificate its QEMU presents.
	CA []byte
}
