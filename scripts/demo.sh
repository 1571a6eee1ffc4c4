#!/usr/bin/env bash
# The main job on one host, local files only: create a VM with a manufactured
# vTPM (sealed state, EK certificates from this host's CA, Secure Boot), boot
# it headless under QEMU + OVMF with `vtpm vm start`, and print what the
# guest's TPM reports.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VTPM_HOME:-}" ]; then
	# A data root of the demo's own; its parent must be searchable by the
	# unprivileged user the vTPM runs as.
	export VTPM_HOME=$PWD/.cache/demo/home
	mkdir -p "$PWD/.cache/demo" && chmod 755 "$PWD/.cache" "$PWD/.cache/demo"
fi
vtpm=bin/vtpm
work=$(mktemp -d "${TMPDIR:-/tmp}/vtpm-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "==> guest image (Debian cloud kernel + busybox + tpm2-tools; built once, cached)"
eval "$(go run ./internal/qemutest/guestimage)"

# What the guest runs, then it powers off.
guest_script='
echo "TPM version: $(cat /sys/class/tpm/tpm0/tpm_version_major)"
tpm2_getcap properties-fixed | grep -A2 -E "TPM2_PT_(FAMILY_INDICATOR|MANUFACTURER):" | grep -E "TPM2_PT|value"
echo "Secure Boot (measured): $(tpmtest secureboot)"
echo "PCRs after measured boot:"
tpm2_pcrread sha256:0,7
if tpm2_nvread -C o 0x1c00002 -o /tmp/ek.der 2>/dev/null; then
	echo "EKCERT:$(base64 -w0 /tmp/ek.der)"
else
	echo "EK certificate: none in NV 0x1c00002"
fi'

# A fresh demo VM each run.
if $vtpm vm show demo >/dev/null 2>&1; then
	$vtpm vm stop demo --timeout 0 >/dev/null 2>&1 || true
	$vtpm vm delete demo --delete-tpm --yes >/dev/null
fi
echo "==> vtpm vm create demo --os linux --tpm (data root $VTPM_HOME)"
$vtpm vm create demo --os linux --tpm --no-disk --memory 512M \
	--kernel "$KERNEL" --initrd "$INITRD" \
	--append "quiet no_timer_check vtpm.run=$(printf '%s' "$guest_script" | base64 -w0)"
$vtpm tpm show "$VTPM_HOME/vms/demo/tpm" | sed -n '1,3p'

echo "==> vtpm vm start demo --console (headless QEMU, OVMF Secure Boot, tpm-crb; about 15 s without KVM)"
# The firmware's screen control sequences are dropped from the log.
timeout 300 $vtpm vm start demo --console </dev/null | tr -d '\r' |
	sed -e 's/\x1b\[[0-9;=?]*[A-Za-z]//g' >"$work/console.log" || true

echo "==> what the guest's TPM reports"
grep -v -E '^\[|^$|EKCERT:' "$work/console.log" | sed -n '/^TPM version/,$p'
if cert=$(grep -o 'EKCERT:[A-Za-z0-9+/=]*' "$work/console.log" | head -1); then
	echo "${cert#EKCERT:}" | base64 -d >"$work/ek.der"
	echo "EK certificate: $(openssl x509 -inform der -in "$work/ek.der" -noout -subject -issuer | tr '\n' ' ')"
fi
grep -q '^TPM version: 2' "$work/console.log" || { echo "demo: the guest did not see a TPM 2.0; console log:" >&2; cat "$work/console.log" >&2; exit 1; }
echo "==> done: the VM's bundle (vm.json, UEFI variables, sealed TPM state) is in $VTPM_HOME/vms/demo"
$vtpm vm list -a
