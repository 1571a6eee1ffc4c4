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
package vm
