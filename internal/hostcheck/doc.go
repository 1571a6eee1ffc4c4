// Package hostcheck is the one place that knows what a host provides to run
// vTPMs and VMs: whether QEMU can run guests under KVM (probed by running
// QEMU, once per boot: the verdict is kept in the runtime directory), which
// QEMU binary and which of its features are there, where the OVMF firmware
// files are, and how well the host isolates an instance (seccomp, Landlock,
// no_new_privs, locked memory, namespaces), protects the keystore and guards
// the data root.
//
// Each check is a [Check]: a name, a [Status], a detail and the remedies as
// [errdefs.Remedy] values. `vtpm doctor` prints them; a VM's pre-flight and
// the QEMU test harness use the same probes and file finders, so the three
// never disagree about the host.
package hostcheck
