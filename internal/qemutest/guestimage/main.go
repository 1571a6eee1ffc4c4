// Command guestimage builds (or finds in the cache) the small Linux guest
// that tests and the demo boot, and prints its kernel and initrd paths.
package main

import (
	"context"
	"fmt"
	"os"

	"vtpm/internal/qemutest"
)

func main() {
	img, err := qemutest.BuildImage(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "guestimage:", err)
		os.Exit(1)
	}
	fmt.Printf("KERNEL=%s\nINITRD=%s\n", img.Kernel, img.Initrd)
}
