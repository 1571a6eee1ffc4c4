package transfer

import (
	"context"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"testing"

	"vtpm/internal/vm"
)

// BenchmarkMove moves a stopped VM with a 64 MiB disk of random data back
// and forth between two data roots, through the stream.
func BenchmarkMove(b *testing.B) {
	hosts := [2]*vm.Registry{testHost(b), testHost(b)}
	disk := filepath.Join(b.TempDir(), "d.raw")
	f, _ := os.Create(disk)
	io.CopyN(f, rand.Reader, 64<<20)
	f.Close()
	on := true
	res, err := hosts[0].Create(vm.CreateOptions{Name: "m", OS: vm.Linux, TPM: &on, Disk: disk})
	if err != nil {
		b.Fatal(err)
	}
	admit(b, hosts[0], hosts[1], res.VM.TPMDir())
	b.SetBytes(64 << 20)
	b.ResetTimer()
	at := 0
	for range b.N {
		v, err := hosts[at].Open("m")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Send(context.Background(), hosts[at], v, Local{Registry: hosts[1-at]}, Options{Op: vm.OpMove, To: "x"}); err != nil {
			b.Fatal(err)
		}
		os.RemoveAll(hosts[at].BackupsDir())
		at = 1 - at
	}
}
