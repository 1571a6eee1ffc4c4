// Package qemutest boots a small Linux guest under QEMU with a virtual TPM
// so that tests can drive the TPM from inside a real VM. It is used only by
// tests.
//
// # The guest
//
// BuildImage assembles the guest once and caches it in $VTPM_TEST_CACHE
// (default .cache/guest at the module root), keyed by a hash of every input:
// Debian's newest linux-image-6.1.0-*-cloud-amd64 (fetched with apt-get
// download and unpacked with dpkg -x, never installed; TPM TIS and CRB
// drivers are built in, which the build checks), busybox-static, tpm2-tools
// with every library it loads (including the dlopen'ed TCTI modules), the
// dynamic loader, the kernel's virtio-blk modules (the guest loads them,
// so a VM's disks are /dev/vda…), the /init in guest/init and the helper
// guest/tpmtest.sh.
// Builds happen in a temporary directory that is renamed into place under a
// flock, so parallel test binaries share one image safely. Start calls
// BuildImage itself.
//
// The guest boots OVMF with direct kernel boot, so the firmware measures the
// boot into PCRs 0-7. Its /init mounts proc, sys, devtmpfs, securityfs and a
// tmpfs on /tmp, sets TPM2TOOLS_TCTI=device:/dev/tpmrm0 and then serves
// commands on ttyS0: each request is "<id> <base64 command>", each reply is
// the command's combined output framed by markers that carry the id and the
// exit status. Commands are limited to about 3000 bytes after base64, and
// carriage returns in output are dropped.
//
// Inside the guest, /bin/tpmtest keeps tests short:
//
//	tpmtest seal <handle> [secret]   seal to PCR 7 (sha256) at a persistent handle
//	tpmtest unseal <handle>          PCR 7 policy session + unseal, prints the secret
//	tpmtest nvwrite <index> <data>   (re)define an NV index and write data
//	tpmtest nvread <index>           prints the data
//	tpmtest pcr <n>                  prints the sha256 PCR as hex
//	tpmtest secureboot               prints the measured SecureBoot byte (01/00)
//
// The default secret is "vtpm-test-secret". To keep transient objects loaded
// between commands, bypass the kernel resource manager with
// TPM2TOOLS_TCTI=device:/dev/tpm0.
//
// # Using it from a test
//
//	func TestSomething(t *testing.T) {
//		qemutest.SkipIfUnavailable(t)
//		qemutest.SkipIfNoSWTPM(t)
//		t.Parallel()
//		ctx := t.Context()
//		tpm, err := qemutest.StartTPM(ctx, t, qemutest.TPMConfig{}) // swtpm, or Command: {vtpm, "swtpm"}
//		if err != nil {
//			t.Fatal(err)
//		}
//		vm, err := qemutest.Start(ctx, t, qemutest.Config{TPMSocket: tpm.Socket})
//		if err != nil {
//			t.Fatal(err)
//		}
//		out, err := vm.Run(ctx, "tpm2_pcrread sha256:0,7")
//		...
//	}
//
// Everything is stopped at the end of the test; on failure the tails of the
// serial console and QEMU logs are printed. For a restart, call vm.Stop and
// tpm.Wait (QEMU's quit makes swtpm exit), then start both again with the
// same TPMConfig.StateDir and Config.VarsFile.
//
// For live migration, start the destination with Config.Incoming set to
// "unix:<path>" and a TPM with an empty state directory, call
// src.Migrate(ctx, uri), then dst.WaitStatus(ctx, "running"). Each QEMU
// has its own serial socket; the guest's command loop simply keeps running,
// so dst.Run works right away.
//
// # Environment
//
//   - VTPM_TEST_CACHE: image cache directory.
//   - VTPM_TEST_ACCEL=kvm|tcg: skip the KVM probe. Otherwise KVM is used
//     when a short firmware boot under KVM works (hostcheck.KVMUsable, the
//     probe `vtpm doctor` and `vtpm vm start` use), else TCG.
//   - VTPM_TEST_SWTPM: the TPM command for StartTPM, e.g. "/path/vtpm swtpm".
//   - go test -short skips VM tests.
package qemutest
