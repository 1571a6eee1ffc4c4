// Package e2e holds end-to-end tests: real QEMU guests booted with OVMF
// against vtpm instances, compared with swtpm where the behaviour must match.
// The shared guest image comes from internal/qemutest.
package e2e
