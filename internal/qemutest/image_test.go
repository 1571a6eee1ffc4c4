package qemutest

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"os/exec"
	"testing"

	"vtpm/internal/testutil"
)

// TestBuildImage builds (or finds) the cached guest image; run it alone to
// warm a CI cache.
func TestBuildImage(t *testing.T) {
	if testing.Short() {
		t.Skip("image build skipped in -short mode")
	}
	for _, tool := range []string{"apt-get", "dpkg", "busybox", "tpm2"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Missing(t, "%s not installed; cannot build the guest image", tool)
		}
	}
	img, err := BuildImage(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(img.Kernel); err != nil || fi.Size() < 1<<20 {
		t.Fatalf("kernel %s: %v", img.Kernel, err)
	}
	f, err := os.Open(img.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"init", "dev/console", "usr/bin/tpmtest", "usr/bin/tpm2_unseal",
		"usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0", "usr/lib64/ld-linux-x86-64.so.2", "TRAILER!!!"} {
		if !bytes.Contains(data, append([]byte(name), 0)) {
			t.Errorf("initramfs has no %s", name)
		}
	}
	t.Logf("image %s (kernel %s, initramfs %d bytes uncompressed)", img.Dir, img.KernelPackage, len(data))
}
