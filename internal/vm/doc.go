// Package vm manages VM bundles on one host: a directory per VM holding
// vm.json, its UEFI variable store, its disk and its vTPM's sealed state
// (tpm/). It applies the rules a VM's TPM must follow (UEFI, no passthrough
// boot disk, Secure Boot with it, Windows 11 needs all three), keeps the
// host's registry of bundles, clones and templates bundles with the right
// TPM identity, and starts VMs: pre-flight checks, the vTPM instance, then
// QEMU with OVMF.
//
// Bundle layout:
//
//	vm.json          name, UUID, OS profile, firmware, Secure Boot, disks, TPM
//	OVMF_VARS.fd     the UEFI variable store (Microsoft's keys with Secure Boot)
//	disk.qcow2       the disk made by --disk-size (other disks are referenced)
//	tpm/             sealed TPM state and key protector
//	logs/            serial.log, qemu.log, tpm.log
//
// Run-time files (QEMU's and the vTPM's pid files and sockets) live in a
// per-bundle directory under $XDG_RUNTIME_DIR/vtpm, /run/vtpm (root) or
// the temporary directory; a VM's state is derived from its live processes.
//
// A bundle travels between hosts, so vm.json is untrusted input: one
// parser ([ParseConfig]) reads it for every command, bounds every value,
// takes device models and formats from fixed lists, and keeps paths inside
// the bundle unless the host's configuration (host.json in the data root,
// [HostConfig]) allows them. Values that reach a QEMU option string are
// escaped as QEMU parses them; sizes reach qemu-img as digits after "--".
//
// QEMU is confined: under its own seccomp sandbox ([hostcheck.QEMUSandbox]) and, when
// vm start runs as root, as an unprivileged user ([hostcheck.QEMUUser]). It opens
// nothing of the VM's by name but the kernel and initrd: disks, the
// variable store and logs are handed over as descriptors (fd sets), its
// monitor and serial sockets as listening descriptors, and the vTPM's
// control socket as a connected one, so QEMU needs no access to the bundle,
// the run directory or host devices.
package vm
