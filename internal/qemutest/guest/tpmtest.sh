#!/bin/sh
# Common TPM tasks for tests, so a test's command line stays short.
#   tpmtest seal <persistent-handle> [secret]   seal secret to PCR 7 (sha256)
#   tpmtest unseal <persistent-handle>          print the sealed secret
#   tpmtest nvwrite <index> <data>              (re)define an NV index and write data
#   tpmtest nvread <index>                      print the NV index's data
#   tpmtest pcr <index>                         print the sha256 PCR value as hex
#   tpmtest secureboot                          print the measured SecureBoot value (01 or 00)
set -e

DEFAULT_SECRET="vtpm-test-secret"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

usage() {
	sed -n '2,9p' "$0" >&2
	exit 2
}

persistent_exists() {
	tpm2_getcap handles-persistent | grep -qi "$1"
}

nv_exists() {
	tpm2_getcap handles-nv-index | grep -qi "$1"
}

cmd=$1
[ -n "$cmd" ] || usage
shift

case "$cmd" in
seal)
	handle=$1
	secret=${2:-$DEFAULT_SECRET}
	[ -n "$handle" ] || usage
	if persistent_exists "$handle"; then
		tpm2_evictcontrol -Q -C o -c "$handle"
	fi
	tpm2_createprimary -Q -C o -c "$work/primary.ctx"
	tpm2_pcrread -Q -o "$work/pcr.bin" sha256:7
	tpm2_createpolicy -Q --policy-pcr -l sha256:7 -f "$work/pcr.bin" -L "$work/policy"
	printf '%s' "$secret" | tpm2_create -Q -C "$work/primary.ctx" -L "$work/policy" \
		-i- -u "$work/seal.pub" -r "$work/seal.priv"
	tpm2_load -Q -C "$work/primary.ctx" -u "$work/seal.pub" -r "$work/seal.priv" -c "$work/seal.ctx"
	tpm2_evictcontrol -Q -C o -c "$work/seal.ctx" "$handle"
	;;
unseal)
	handle=$1
	[ -n "$handle" ] || usage
	tpm2_startauthsession -Q --policy-session -S "$work/session.ctx"
	status=0
	tpm2_policypcr -Q -S "$work/session.ctx" -l sha256:7 &&
		tpm2_unseal -p "session:$work/session.ctx" -c "$handle" || status=$?
	tpm2_flushcontext "$work/session.ctx" || true
	exit "$status"
	;;
nvwrite)
	index=$1
	data=$2
	[ -n "$index" ] && [ -n "$data" ] || usage
	size=$(printf '%s' "$data" | wc -c)
	if nv_exists "$index"; then
		tpm2_nvundefine -Q -C o "$index"
	fi
	tpm2_nvdefine -Q -C o -s "$size" -a "ownerread|ownerwrite|authread|authwrite" "$index"
	printf '%s' "$data" | tpm2_nvwrite -Q -C o -i- "$index"
	;;
nvread)
	index=$1
	[ -n "$index" ] || usage
	# Without -s tpm2_nvread warns on stderr; keep the output the bare data.
	if ! tpm2_nvread -C o -o "$work/nv" "$index" 2>"$work/err"; then
		cat "$work/err" >&2
		exit 1
	fi
	cat "$work/nv"
	;;
pcr)
	index=$1
	[ -n "$index" ] || usage
	tpm2_pcrread -Q -o "$work/pcr.bin" "sha256:$index"
	od -An -tx1 -v "$work/pcr.bin" | tr -d ' \n'
	echo
	;;
secureboot)
	# The firmware measures the SecureBoot variable into PCR 7.
	tpm2_eventlog /sys/kernel/security/tpm0/binary_bios_measurements >"$work/log"
	value=$(grep -A1 'UnicodeName: SecureBoot$' "$work/log" | sed -n 's/.*VariableData: "\(..\)".*/\1/p' | head -n1)
	[ -n "$value" ] || { echo "no SecureBoot measurement in the event log" >&2; exit 1; }
	echo "$value"
	;;
*)
	usage
	;;
esac
