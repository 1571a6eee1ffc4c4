// Package statefile reads and writes swtpm 0.7.1's on-disk state files,
// key options and migration blobs byte for byte, so that a TPM created by
// swtpm keeps working under vtpm and QEMU migration streams interoperate in
// both directions.
package statefile
