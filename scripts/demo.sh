#!/usr/bin/env bash
# The main job on one host, local files only: start a vTPM with sealed state,
# boot a small Linux guest under QEMU + OVMF against it (headless), and print
# what the guest's TPM reports.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/tmp}/vtpm-demo.XXXXXX")
export VTPM_HOME=${VTPM_HOME:-$PWD/.cache/demo/home}
tpm_pid=""
cleanup() {
	[ -n "$tpm_pid" ] && kill "$tpm_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

echo "==> guest image (Debian cloud kernel + busybox + tpm2-tools; built once, cached)"
eval "$(go run ./internal/qemutest/guestimage)"

state="$work/tpm"
mkdir -p "$state"
if bin/vtpm tpm --help 2>/dev/null | grep -q "^  manufacture"; then
	echo "==> manufacturing the vTPM (EK certificates from this host's CA)"
	bin/vtpm tpm manufacture "$state"
fi
echo "==> starting the vTPM (sealed state in $state, keys under $VTPM_HOME)"
bin/vtpm swtpm socket --tpm2 --tpmstate dir="$state" \
	--ctrl type=unixio,path="$work/tpm.sock" --log file="$work/vtpm.log",level=1 &
tpm_pid=$!
for _ in $(seq 100); do [ -S "$work/tpm.sock" ] && break; sleep 0.05; done
[ -S "$work/tpm.sock" ] || { cat "$work/vtpm.log" >&2; exit 1; }

# What the guest runs, then it powers off.
guest_script='
echo "TPM version: $(cat /sys/class/tpm/tpm0/tpm_version_major)"
tpm2_getcap properties-fixed | grep -A2 -E "TPM2_PT_(FAMILY_INDICATOR|MANUFACTURER):" | grep -E "TPM2_PT|value"
echo "PCRs after measured boot:"
tpm2_pcrread sha256:0,7
if tpm2_nvread -C o 0x1c00002 -o /tmp/ek.der 2>/dev/null || tpm2_nvread 0x1c00002 -o /tmp/ek.der 2>/dev/null; then
	echo "EKCERT:$(base64 -w0 /tmp/ek.der)"
else
	echo "EK certificate: none in NV 0x1c00002"
fi'
accel=tcg
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$work/vars.fd"
echo "==> booting the guest under QEMU ($accel, OVMF, tpm-crb) — about 15 s"
timeout 300 qemu-system-x86_64 -nodefaults -no-user-config -display none -machine q35 -accel "$accel" -m 512M \
	-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
	-drive if=pflash,format=raw,unit=1,file="$work/vars.fd" \
	-kernel "$KERNEL" -initrd "$INITRD" \
	-append "console=ttyS0 quiet vtpm.run=$(printf '%s' "$guest_script" | base64 -w0)" \
	-chardev socket,id=chrtpm,path="$work/tpm.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm \
	-device tpm-crb,tpmdev=tpm0 -serial stdio </dev/null |
	tr -d '\r' | sed -e 's/\x1b\[[0-9;=?]*[A-Za-z]//g' >"$work/console.log" || true

echo "==> what the guest's TPM reports"
sed -n '/^TPM version/,$p' "$work/console.log" | grep -v -E '^\[ *[0-9]|^$|EKCERT:'
if cert=$(grep -o 'EKCERT:[A-Za-z0-9+/=]*' "$work/console.log" | head -1); then
	echo "${cert#EKCERT:}" | base64 -d >"$work/ek.der"
	echo "EK certificate: $(openssl x509 -inform der -in "$work/ek.der" -noout -subject -issuer | tr '\n' ' ')"
fi
grep -q '^TPM version: 2' "$work/console.log" || { echo "demo: the guest did not see a TPM 2.0; console log:" >&2; cat "$work/console.log" >&2; exit 1; }
echo "==> done: the vTPM's sealed state was in $state"
ls -l "$state"
