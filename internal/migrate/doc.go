// Package migrate moves a running VM to another host: live migration with
// its vTPM, its disks and its firmware variables.
//
// The source host drives it (Source.Migrate); the destination host is
// behind the Destination interface, served in process (Local) or by a
// peer's host service over its API. The steps, each named in a failure
// (Step):
//
//  1. pre-flight on both sides before anything starts: the VM runs here and
//     its QEMU answers; the destination has no VM of that name or UUID,
//     runs the same machine type on the same or a newer QEMU, has the
//     firmware, the isolation the VM's policy requires, room for the disks,
//     and a guardian that opens the TPM's key protector, whose owner it
//     trusts. With Grant, a protector that does not admit the destination's
//     guardian gets its row, as `protector grant` would, and the check runs
//     again; without, the refusal names that guardian and the way out.
//  2. prepare: the destination makes the bundle, unregistered, with blank
//     disks of the source's sizes, starts the vTPM instance on an empty state
//     directory (it adopts the TPM from the migration stream, sealed to the
//     hosts the protector admits) and QEMU paused, waiting for the stream;
//     it serves the disks over NBD and listens for the stream, both over TLS.
//  3. disks: the source mirrors each disk in its bundle to the destination's
//     NBD export while the guest runs (QEMU's blockdev-mirror, sync=full),
//     until every mirror is in step. Disks outside the bundle are shared
//     storage and are not copied.
//  4. memory: the source migrates (return path on, so a destination that
//     cannot load the state fails the migration instead of running a broken
//     guest; paused before switch-over, so the mirrors end, in step, while
//     the guest is stopped).
//  5. commit: the destination stops serving its disks, resumes the guest and
//     registers the VM. Then the source quits its QEMU and retires the VM:
//     its TPM state is kept as a backup under the data root.
//
// Both QEMUs authenticate each other with TLS certificates issued under
// each host's guardian (package hostcert), so neither the memory with the
// TPM's state blobs nor the disk data crosses the network in clear.
//
// Any failure before the commit cancels the migration and the mirrors,
// resumes the source guest if it was paused, and aborts the destination,
// which stops its QEMU and vTPM and removes the bundle; a host service that
// restarts removes bundles left half-received (vm.Registry.CleanIncoming).
package migrate
