package testutil

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

var (
	keyserviceOnce sync.Once
	keyserviceErr  error
)

// KeyserviceBinary builds cmd/vtpm-keyservice once per test process,
// beside the vtpm of Binary (where `vtpm keyservice …` looks for it), and
// returns its path.
func KeyserviceBinary(t testing.TB) string {
	t.Helper()
	dir := filepath.Dir(Binary(t))
	keyserviceOnce.Do(func() {
		_, file, _, _ := runtime.Caller(0)
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "vtpm-keyservice"), "./cmd/vtpm-keyservice")
		cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..")
		if out, err := cmd.CombinedOutput(); err != nil {
			keyserviceErr = fmt.Errorf("go build ./cmd/vtpm-keyservice: %v\n%s", err, out)
		}
	})
	if keyserviceErr != nil {
		t.Fatal(keyserviceErr)
	}
	return filepath.Join(dir, "vtpm-keyservice")
}
