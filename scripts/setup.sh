#!/usr/bin/env bash
# Installs what vtpm needs to build and what its tests drive: libtpms (the TPM
# engine), QEMU + OVMF, and the peers and clients we test against (swtpm,
# swtpm-tools, tpm2-tools, libvirt 9.0 with its QEMU driver). Debian 12.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
	gcc make pkg-config libtpms-dev \
	qemu-system-x86 qemu-utils ovmf \
	tpm2-tools libtss2-tcti-swtpm0 swtpm swtpm-tools \
	busybox-static cpio gzip openssl ca-certificates protobuf-compiler \
	libvirt-daemon-system libvirt-clients
# etcd 3.4: an external etcd for the key service's tests of that mode (the
# service embeds its own by default).
$SUDO apt-get install -y -q --no-install-recommends etcd-server
if ! command -v go >/dev/null; then
	echo "setup: Go 1.26 or newer is required (https://go.dev/dl/)" >&2
	exit 1
fi
