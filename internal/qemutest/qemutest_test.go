package qemutest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

const (
	sealHandle = "0x81000010"
	nvIndex    = "0x1500016"
	nvData     = "vtpm-nv-data"
)

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func skipUnlessVMTests(t *testing.T) {
	t.Helper()
	SkipIfUnavailable(t)
	SkipIfNoSWTPM(t)
}

func mustRun(ctx context.Context, t *testing.T, vm *VM, cmd string) string {
	t.Helper()
	out, err := vm.Run(ctx, cmd)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}

func startPair(ctx context.Context, t *testing.T, stateDir string, cfg Config) (*TPM, *VM) {
	t.Helper()
	tpm, err := StartTPM(ctx, t, TPMConfig{StateDir: stateDir})
	if err != nil {
		t.Fatal(err)
	}
	cfg.TPMSocket = tpm.Socket
	vm, err := Start(ctx, t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return tpm, vm
}

// stopPair shuts the VM down and waits until the TPM process is gone too,
// so the next start reads the TPM state from disk.
func stopPair(ctx context.Context, t *testing.T, tpm *TPM, vm *VM) {
	t.Helper()
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := tpm.Wait(wctx); err != nil {
		t.Logf("tpm did not exit by itself after quit (%v); stopping it", err)
		if err := tpm.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

func assertNonZeroPCR(ctx context.Context, t *testing.T, vm *VM, pcr string) {
	t.Helper()
	v := strings.TrimSpace(mustRun(ctx, t, vm, "tpmtest pcr "+pcr))
	if len(v) != 64 || strings.Trim(v, "0") == "" {
		t.Errorf("PCR %s = %q, want a non-zero sha256 value", pcr, v)
	}
}

// TestPersistAcrossRestart seals to PCR 7 and writes NV, stops QEMU and
// swtpm, starts both again and reads everything back.
func TestPersistAcrossRestart(t *testing.T) {
	skipUnlessVMTests(t)
	t.Parallel()
	for _, dev := range []string{"tpm-crb", "tpm-tis"} {
		t.Run(dev, func(t *testing.T) {
			t.Parallel()
			ctx := testContext(t)
			state := ShortTempDir(t)
			cfg := Config{TPMDevice: dev, Name: dev, VarsFile: filepath.Join(state, "vars.fd")}

			tpm, vm := startPair(ctx, t, filepath.Join(state, "tpm"), cfg)
			mustRun(ctx, t, vm, "ls /dev/tpm0 /dev/tpmrm0 /sys/kernel/security/tpm0/binary_bios_measurements")
			if v := strings.TrimSpace(mustRun(ctx, t, vm, "cat /sys/class/tpm/tpm0/tpm_version_major")); v != "2" {
				t.Fatalf("tpm_version_major = %q, want 2", v)
			}
			assertNonZeroPCR(ctx, t, vm, "0")
			assertNonZeroPCR(ctx, t, vm, "7")
			mustRun(ctx, t, vm, "tpmtest seal "+sealHandle)
			mustRun(ctx, t, vm, "tpmtest nvwrite "+nvIndex+" "+nvData)
			if got := mustRun(ctx, t, vm, "tpmtest unseal "+sealHandle); got != "vtpm-test-secret" {
				t.Fatalf("unseal before restart = %q", got)
			}
			stopPair(ctx, t, tpm, vm)

			_, vm = startPair(ctx, t, filepath.Join(state, "tpm"), cfg)
			if got := mustRun(ctx, t, vm, "tpmtest unseal "+sealHandle); got != "vtpm-test-secret" {
				t.Errorf("unseal after restart = %q, want the sealed secret", got)
			}
			if got := mustRun(ctx, t, vm, "tpmtest nvread "+nvIndex); got != nvData {
				t.Errorf("nvread after restart = %q, want %q", got, nvData)
			}
		})
	}
}

// TestRunReportsExitStatus checks the command channel's framing.
func TestRunReportsExitStatus(t *testing.T) {
	skipUnlessVMTests(t)
	t.Parallel()
	ctx := testContext(t)
	_, vm := startPair(ctx, t, "", Config{Name: "run"})

	out, err := vm.Run(ctx, "echo to-stdout; echo to-stderr >&2; exit 3")
	var ce *CommandError
	if !errors.As(err, &ce) || ce.Status != 3 {
		t.Fatalf("Run = %v, want a CommandError with status 3", err)
	}
	if out != "to-stdout\nto-stderr\n" {
		t.Errorf("output = %q", out)
	}
	// Output without a final newline and with marker-like text survives.
	if got := mustRun(ctx, t, vm, `printf '@@END x 0@@\n"quotes" %s' "$HOME"`); got != "@@END x 0@@\n\"quotes\" /root" {
		t.Errorf("output = %q", got)
	}
	if got := strings.TrimSpace(mustRun(ctx, t, vm, "tpmtest secureboot")); got != "00" {
		t.Errorf("measured SecureBoot = %q, want 00", got)
	}
	if st, err := vm.Status(ctx); err != nil || st != "running" {
		t.Errorf("Status = %q, %v; want running", st, err)
	}
}

// TestSecureBoot boots the Secure Boot firmware with Microsoft keys and
// checks that the firmware measured Secure Boot as enabled.
func TestSecureBoot(t *testing.T) {
	skipUnlessVMTests(t)
	t.Parallel()
	ctx := testContext(t)
	_, vm := startPair(ctx, t, "", Config{Name: "sb", SecureBoot: true})
	if got := strings.TrimSpace(mustRun(ctx, t, vm, "tpmtest secureboot")); got != "01" {
		t.Errorf("measured SecureBoot = %q, want 01", got)
	}
	assertNonZeroPCR(ctx, t, vm, "7")
}

// direct talks to /dev/tpm0 without the kernel's resource manager, so
// transient objects stay loaded between commands.
const direct = "export TPM2TOOLS_TCTI=device:/dev/tpm0; "

var nameRE = regexp.MustCompile(`(?m)^name: ([0-9a-f]+)$`)

// TestLiveMigration migrates a guest to a QEMU backed by a TPM with an
// empty state directory and checks that a PCR and loaded objects arrive.
func TestLiveMigration(t *testing.T) {
	skipUnlessVMTests(t)
	t.Parallel()
	ctx := testContext(t)

	_, src := startPair(ctx, t, "", Config{Name: "src"})
	digest := strings.Repeat("ab", 32)
	mustRun(ctx, t, src, direct+"tpm2_pcrextend 16:sha256="+digest)
	mustRun(ctx, t, src, direct+`tpm2_createprimary -Q -C o -c /tmp/p.ctx &&
tpm2_create -Q -C 0x80000000 -G ecc -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' -u /tmp/k.pub -r /tmp/k.priv &&
tpm2_load -Q -C 0x80000000 -u /tmp/k.pub -r /tmp/k.priv -c /tmp/k.ctx`)
	handles := mustRun(ctx, t, src, direct+"tpm2_getcap handles-transient")
	if !strings.Contains(handles, "0x80000001") {
		t.Fatalf("transient handles before migration:\n%s", handles)
	}
	m := nameRE.FindStringSubmatch(mustRun(ctx, t, src, direct+"tpm2_readpublic -c 0x80000001"))
	if m == nil {
		t.Fatal("no name in tpm2_readpublic output")
	}
	keyName := m[1]

	dstTPM, err := StartTPM(ctx, t, TPMConfig{})
	if err != nil {
		t.Fatal(err)
	}
	uri := "unix:" + filepath.Join(ShortTempDir(t), "mig.sock")
	dst, err := Start(ctx, t, Config{Name: "dst", TPMSocket: dstTPM.Socket, Incoming: uri})
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if err := src.Migrate(ctx, uri); err != nil {
		t.Fatal(err)
	}
	if err := dst.WaitStatus(ctx, "running"); err != nil {
		t.Fatal(err)
	}
	t.Logf("migration took %v", time.Since(began).Round(time.Millisecond))
	if st, err := src.Status(ctx); err != nil || st != "postmigrate" {
		t.Errorf("source status = %q, %v; want postmigrate", st, err)
	}

	zero := make([]byte, 32)
	d, _ := hex.DecodeString(digest)
	want := sha256.Sum256(append(zero, d...))
	if got := strings.TrimSpace(mustRun(ctx, t, dst, "tpmtest pcr 16")); got != hex.EncodeToString(want[:]) {
		t.Errorf("PCR 16 after migration = %s, want %x", got, want)
	}
	handles = mustRun(ctx, t, dst, direct+"tpm2_getcap handles-transient")
	if !strings.Contains(handles, "0x80000000") || !strings.Contains(handles, "0x80000001") {
		t.Fatalf("transient handles after migration:\n%s", handles)
	}
	m = nameRE.FindStringSubmatch(mustRun(ctx, t, dst, direct+"tpm2_readpublic -c 0x80000001"))
	if m == nil || m[1] != keyName {
		t.Errorf("loaded key's name after migration = %v, want %s", m, keyName)
	}
	mustRun(ctx, t, dst, direct+`echo migrated > /tmp/msg &&
tpm2_sign -c 0x80000001 -g sha256 -o /tmp/sig /tmp/msg &&
tpm2_verifysignature -c 0x80000001 -g sha256 -m /tmp/msg -s /tmp/sig`)
}
