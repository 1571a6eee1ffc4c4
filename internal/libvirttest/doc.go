// Package libvirttest runs an unchanged libvirtd for tests, with the TPM
// emulator of the test's choice found first in its PATH as swtpm and
// swtpm_setup, and drives it with virsh. It is used only by tests.
//
// # What libvirt 9.0 does with an emulator TPM
//
// For <tpm><backend type='emulator' version='2.0'/></tpm> libvirt 9.0
// (Debian 12) keeps the TPM in /var/lib/libvirt/swtpm/<domain uuid>/tpm2
// and runs everything as its swtpm_user and swtpm_group (qemu.conf;
// default tss), with its own environment (so $HOME is libvirtd's):
//
//   - at daemon start and before using them, `swtpm socket
//     --print-capabilities` and `swtpm_setup --print-capabilities`;
//   - when the state directory does not exist yet (libvirt 9.0 asks only
//     whether the directory exists; later releases also treat an empty one
//     as new), it creates it (0700, tss) and runs `swtpm_setup --tpm2
//     --tpm-state DIR --vmid NAME:UUID --logfile LOG --createek
//     --create-ek-cert --create-platform-cert --lock-nvram --not-overwrite`;
//     a directory that exists is never set up again, whatever it holds;
//   - then `swtpm socket --ctrl type=unixio,path=SOCK,mode=0600 --tpmstate
//     dir=DIR,mode=0600 --log file=LOG --terminate --tpm2`, daemonised by
//     libvirt itself (it writes the pid file);
//   - on stop, `swtpm_ioctl --unix SOCK -s`;
//   - `virsh undefine --nvram` deletes /var/lib/libvirt/swtpm/<uuid>
//     (the whole tree), `--keep-tpm` leaves it.
//
// So the question "does this domain already have a TPM" is answered by the
// directory, not by swtpm's file names: vtpm's sealed state (identity file,
// key protector, sealed slots) answers it as swtpm's files do.
//
// # Running
//
// [Start] needs root, libvirtd, virtlogd and virsh (scripts/setup.sh
// installs libvirt-daemon-system and libvirt-clients), and no libvirtd
// already running: the test starts its own, in the foreground, so that it
// controls the daemon's PATH and environment. A virtlogd that already runs
// is used as it is. Nothing in /etc/libvirt is changed.
package libvirttest
