package qemutest

import (
	"context"
	"strings"
	"testing"
	"time"
)

func TestBootCRB(t *testing.T) {
	SkipIfUnavailable(t)
	SkipIfNoSWTPM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	tpm, err := StartTPM(ctx, t, TPMConfig{})
	if err != nil {
		t.Fatal(err)
	}
	vm, err := Start(ctx, t, Config{TPMSocket: tpm.Socket})
	if err != nil {
		t.Fatal(err)
	}
	out, err := vm.Run(ctx, "ls /dev/tpm0; cat /sys/class/tpm/tpm0/tpm_version_major; tpm2_pcrread sha256:0,7")
	t.Logf("out=%q err=%v", out, err)
	if !strings.Contains(out, "2") {
		t.Fatal("no")
	}
}
