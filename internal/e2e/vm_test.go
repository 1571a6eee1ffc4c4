package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// vmHost runs `vtpm` CLI commands against one data root: one simulated host.
type vmHost struct {
	t    *testing.T
	bin  string
	home string
	env  []string
}

func newVMHost(t *testing.T, dir string) *vmHost {
	t.Helper()
	accel := "tcg"
	if qemutest.KVMAvailable() {
		accel = "kvm"
	}
	home := filepath.Join(dir, "home")
	run := filepath.Join(dir, "run")
	if err := os.MkdirAll(run, 0o700); err != nil {
		t.Fatal(err)
	}
	return &vmHost{t: t, bin: testutil.Binary(t), home: home, env: append(os.Environ(),
		"VTPM_HOME="+home, "VTPM_HOST_TPM=none", "VTPM_ACCEL="+accel, "XDG_RUNTIME_DIR="+run)}
}

// with returns h reporting failures to t (a subtest).
func (h *vmHost) with(t *testing.T) *vmHost {
	c := *h
	c.t = t
	return &c
}

// run runs vtpm with args and returns stdout, stderr and the exit error.
func (h *vmHost) run(ctx context.Context, args ...string) (string, string, error) {
	cmd := exec.CommandContext(ctx, h.bin, args...)
	cmd.Env = h.env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// must runs vtpm and fails the test when it exits non-zero.
func (h *vmHost) must(ctx context.Context, args ...string) string {
	h.t.Helper()
	out, errOut, err := h.run(ctx, args...)
	if err != nil {
		h.t.Fatalf("vtpm %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

type listedVM struct {
	Name, UUID, Path, State, Firmware, TPM string
	SecureBoot                             bool `json:"secure_boot"`
	Error                                  string
}

func (h *vmHost) list(ctx context.Context) map[string]listedVM {
	h.t.Helper()
	var vms []listedVM
	if err := json.Unmarshal([]byte(h.must(ctx, "vm", "list", "-a", "--json")), &vms); err != nil {
		h.t.Fatalf("vm list --json does not parse: %v", err)
	}
	m := map[string]listedVM{}
	for _, v := range vms {
		m[v.Name] = v
	}
	return m
}

// guestImage is the test guest's kernel and initramfs.
func guestImage(ctx context.Context, t *testing.T) *qemutest.Image {
	t.Helper()
	img, err := qemutest.BuildImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// createArgs is `vm create NAME --os OS` booting the test guest.
func createArgs(img *qemutest.Image, name, osName string, extra ...string) []string {
	return append([]string{"vm", "create", name, "--os", osName, "--kernel", img.Kernel, "--initrd", img.Initrd,
		"--append", "quiet rdinit=/init no_timer_check", "--memory", "512M", "--cpus", "1", "--no-disk"}, extra...)
}

// bootedVM is a VM started with `vtpm vm start` and its serial command channel.
type bootedVM struct {
	*qemutest.Serial
	name string
}

// startVM starts a VM headless with its console on a socket and waits for
// the guest's command loop; the VM is stopped at cleanup.
func (h *vmHost) startVM(ctx context.Context, t *testing.T, name string) *bootedVM {
	t.Helper()
	h = h.with(t)
	sock := filepath.Join(qemutest.ShortTempDir(t), "ser.sock")
	h.must(ctx, "vm", "start", name, "--serial-socket", sock)
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		h.run(sctx, "vm", "stop", name, "--timeout", "0")
		if t.Failed() {
			if b, err := os.ReadFile(filepath.Join(h.list(sctx)[name].Path, "logs", "serial.log")); err == nil {
				t.Logf("%s: serial log tail:\n%s", name, tail(string(b), 40))
			}
		}
	})
	bctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	s, err := qemutest.DialSerial(bctx, sock)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	t.Cleanup(func() { s.Close() })
	return &bootedVM{Serial: s, name: name}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(strings.ReplaceAll(s, "\r", ""), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (b *bootedVM) must(ctx context.Context, t *testing.T, command string) string {
	t.Helper()
	out, err := b.Run(ctx, command)
	if err != nil {
		t.Fatalf("%s: guest: %v", b.name, err)
	}
	return strings.TrimSpace(out)
}

// ekCert reads the RSA EK certificate from NV 0x01c00002 in the guest.
func (b *bootedVM) ekCert(ctx context.Context, t *testing.T) *x509.Certificate {
	t.Helper()
	out := b.must(ctx, t, "tpm2_nvread -C o -o /tmp/ek.der 0x1c00002 2>/dev/null && base64 /tmp/ek.der")
	der, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(out), ""))
	if err != nil {
		t.Fatalf("%s: EK certificate is not base64: %v", b.name, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("%s: EK certificate from NV 0x1c00002 does not parse: %v", b.name, err)
	}
	return c
}

// ek is what identifies the guest's endorsement key: the public area of the
// RSA EK the guest derives from the endorsement seed (a fresh TPM has a new
// seed), as tpm2_createprimary prints it.
func (b *bootedVM) ek(ctx context.Context, t *testing.T) string {
	t.Helper()
	out := b.must(ctx, t, "tpm2_createprimary -C e -G rsa -c /tmp/ek.ctx | grep -A1 -E '^rsa:|^  rsa:' ; tpm2_flushcontext -t >/dev/null 2>&1; tpm2_readpublic -c /tmp/ek.ctx 2>/dev/null | grep -E '^name:'")
	if !strings.Contains(out, "name:") {
		t.Fatalf("%s: no EK name in tpm2_createprimary/readpublic output:\n%s", b.name, out)
	}
	return out
}

// TestVMRules: a TPM needs UEFI, cannot go to a VM booting from a
// passthrough disk, and Windows 11 needs UEFI and a TPM — each refused with
// its reason, changing nothing.
func TestVMRules(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h := newVMHost(t, qemutest.ShortTempDir(t))
	h.must(ctx, "vm", "create", "biosvm", "--os", "linux", "--firmware", "bios", "--no-disk")
	h.must(ctx, "vm", "create", "ptvm", "--os", "windows10", "--passthrough-disk", "/dev/null")
	for _, tc := range []struct {
		name string
		args []string
		want []string
		gone string // a VM that must not exist afterwards
	}{
		{"tpm add on BIOS", []string{"tpm", "add", "biosvm"},
			[]string{"BIOS firmware", "vTPM needs UEFI", "--firmware uefi"}, ""},
		{"tpm add on passthrough", []string{"tpm", "add", "ptvm"},
			[]string{"passthrough disk /dev/null", "cannot get a vTPM", "qemu-img convert"}, ""},
		{"create linux BIOS with TPM", []string{"vm", "create", "x1", "--os", "linux", "--firmware", "bios", "--tpm"},
			[]string{"vTPM needs UEFI"}, "x1"},
		{"windows11 with BIOS", []string{"vm", "create", "x2", "--os", "windows11", "--firmware", "bios"},
			[]string{"Windows 11 requires UEFI", "Drop --firmware bios"}, "x2"},
		{"windows11 without TPM", []string{"vm", "create", "x3", "--os", "windows11", "--tpm=false"},
			[]string{"Windows 11 requires a TPM 2.0"}, "x3"},
		{"windows11 on a passthrough disk", []string{"vm", "create", "x4", "--os", "windows11", "--passthrough-disk", "/dev/null"},
			[]string{"Windows 11 requires a TPM 2.0", "passthrough disk"}, "x4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, err := h.run(ctx, tc.args...)
			if err == nil {
				t.Fatalf("vtpm %s succeeded, want a refusal:\n%s", strings.Join(tc.args, " "), out)
			}
			for _, w := range tc.want {
				if !strings.Contains(errOut, w) {
					t.Errorf("error does not say %q:\n%s", w, errOut)
				}
			}
		})
	}
	vms := h.list(ctx)
	for _, n := range []string{"x1", "x2", "x3", "x4"} {
		if _, ok := vms[n]; ok {
			t.Errorf("refused VM %s was registered anyway", n)
		}
		if _, err := os.Stat(filepath.Join(h.home, "vms", n)); err == nil {
			t.Errorf("refused VM %s left a bundle behind", n)
		}
	}
	for _, n := range []string{"biosvm", "ptvm"} {
		if vms[n].TPM != "none" || vms[n].SecureBoot {
			t.Errorf("%s after the refused tpm add: TPM %q, Secure Boot %v; want none, off", n, vms[n].TPM, vms[n].SecureBoot)
		}
	}
}

// TestVMWindows11 follows a Windows-11-profile VM (booting the Linux test
// guest) through its life: TPM 2.0, Secure Boot and the EK certificate in the
// guest; a sealed secret survives vm stop / vm start; the bundle copied to
// another host is refused before QEMU starts; clones with a new and a copied
// TPM, and a VM deployed from a template, each have the EK and secrets they
// should.
func TestVMWindows11(t *testing.T) {
	qemutest.SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir := qemutest.ShortTempDir(t)
	h := newVMHost(t, filepath.Join(dir, "a"))
	img := guestImage(ctx, t)

	out := h.must(ctx, createArgs(img, "win11", "windows11")...)
	for _, w := range []string{"uefi", "Secure Boot on", "TPM enabled"} {
		if !strings.Contains(out, w) {
			t.Errorf("vm create --os windows11 does not say %q:\n%s", w, out)
		}
	}
	const secret = "bitlocker-vmk-stand-in"
	var srcEK string
	var srcCert *x509.Certificate
	t.Run("first boot", func(t *testing.T) {
		h := h.with(t)
		g := h.startVM(ctx, t, "win11")
		if v := g.must(ctx, t, "cat /sys/class/tpm/tpm0/tpm_version_major"); v != "2" {
			t.Errorf("guest TPM version %q, want 2", v)
		}
		if v := g.must(ctx, t, "tpmtest secureboot"); v != "01" {
			t.Errorf("measured SecureBoot = %q, want 01 (enabled)", v)
		}
		srcCert = g.ekCert(ctx, t)
		if srcCert.Subject.CommonName != "win11" {
			t.Errorf("EK certificate subject %q, want CN=win11", srcCert.Subject)
		}
		srcEK = g.ek(ctx, t)
		g.must(ctx, t, "tpmtest seal 0x81000010 "+secret)
		if st := h.list(ctx)["win11"].State; st != "running" {
			t.Errorf("vm list state %q while it runs, want running", st)
		}
		h.must(ctx, "vm", "stop", "win11", "--timeout", "1s")
		if st := h.list(ctx)["win11"].State; st != "stopped" {
			t.Errorf("vm list state %q after vm stop, want stopped", st)
		}
	})
	if t.Failed() {
		return
	}
	t.Run("restart unseals", func(t *testing.T) {
		h := h.with(t)
		g := h.startVM(ctx, t, "win11")
		if got := g.must(ctx, t, "tpmtest unseal 0x81000010"); got != secret {
			t.Errorf("unseal after vm stop / vm start = %q, want %q", got, secret)
		}
		h.must(ctx, "vm", "stop", "win11", "--timeout", "0")
	})

	t.Run("other host refuses", func(t *testing.T) {
		h := h.with(t)
		b := newVMHost(t, filepath.Join(dir, "b"))
		copyDir := filepath.Join(dir, "copied-win11")
		if out, err := exec.Command("cp", "-a", h.list(ctx)["win11"].Path, copyDir).CombinedOutput(); err != nil {
			t.Fatalf("cp -a: %v\n%s", err, out)
		}
		// The bundle boots a kernel outside it: the other host allows it
		// first, as a bundle cannot grant itself host files.
		_, errOut, err := b.run(ctx, "vm", "register", copyDir)
		if err == nil || !strings.Contains(errOut, "vtpm host allow-path "+img.Kernel) {
			t.Errorf("vm register of a bundle naming a kernel this host does not allow: %v\n%s", err, errOut)
		}
		b.must(ctx, "host", "allow-path", img.Dir)
		b.must(ctx, "vm", "register", copyDir)
		_, errOut, err = b.run(ctx, "vm", "start", "win11")
		if err == nil {
			t.Fatal("vm start of a bundle whose TPM key this host cannot open succeeded")
		}
		for _, w := range []string{"nothing was started", "cannot be opened on this host", "Its key protector admits", "vtpm guardian import"} {
			if !strings.Contains(errOut, w) {
				t.Errorf("guardian error does not say %q:\n%s", w, errOut)
			}
		}
		if st := b.list(ctx)["win11"].State; st != "stopped" {
			t.Errorf("state %q after the refused start, want stopped", st)
		}
		if log, err := os.ReadFile(filepath.Join(copyDir, "logs", "qemu.log")); err == nil && strings.Contains(string(log), filepath.Join(dir, "b")) {
			t.Errorf("QEMU was started on the other host:\n%s", log)
		}
	})

	// Copies are made while the source is stopped, then boot side by side.
	h.must(ctx, "vm", "clone", "win11", "fresh", "--tpm", "new")
	_, copyWarn, err := h.run(ctx, "vm", "clone", "win11", "twin", "--tpm", "copy")
	if err != nil {
		t.Fatalf("vm clone --tpm copy: %v\n%s", err, copyWarn)
	}
	if !strings.Contains(copyWarn, "WARNING") || !strings.Contains(copyWarn, "share one EK") {
		t.Errorf("vm clone --tpm copy does not warn that the VMs share an EK:\n%s", copyWarn)
	}
	tmplOut := h.must(ctx, "vm", "template", "win11", "golden")
	if !strings.Contains(tmplOut, "TPM required") {
		t.Errorf("vm template does not mark the template \"TPM required\":\n%s", tmplOut)
	}
	golden := h.list(ctx)["golden"]
	if golden.State != "template" || golden.TPM != "required" {
		t.Errorf("template listed as state %q, TPM %q; want template, required", golden.State, golden.TPM)
	}
	if entries, err := os.ReadDir(filepath.Join(golden.Path, "tpm")); err == nil && len(entries) > 0 {
		t.Errorf("template holds TPM files: %v", entries)
	}
	h.must(ctx, "vm", "deploy", "golden", "deployed")

	t.Run("copies", func(t *testing.T) {
		for _, tc := range []struct {
			vm         string
			sameEK     bool
			unsealOK   bool
			certTPMNew bool
		}{
			{"fresh", false, false, true},
			{"twin", true, true, false},
			{"deployed", false, false, true},
		} {
			t.Run(tc.vm, func(t *testing.T) {
				t.Parallel()
				g := h.startVM(ctx, t, tc.vm)
				if v := g.must(ctx, t, "cat /sys/class/tpm/tpm0/tpm_version_major"); v != "2" {
					t.Errorf("guest TPM version %q, want 2", v)
				}
				if ek := g.ek(ctx, t); (ek == srcEK) != tc.sameEK {
					t.Errorf("EK same as the source's: %v, want %v\nsource:\n%s\n%s:\n%s", ek == srcEK, tc.sameEK, srcEK, tc.vm, ek)
				}
				cert := g.ekCert(ctx, t)
				if cert.Equal(srcCert) == tc.certTPMNew {
					t.Errorf("EK certificate equal to the source's: %v, want %v", cert.Equal(srcCert), !tc.certTPMNew)
				}
				got, err := g.Run(ctx, "tpmtest unseal 0x81000010")
				var ce *qemutest.CommandError
				switch {
				case tc.unsealOK && (err != nil || strings.TrimSpace(got) != secret):
					t.Errorf("unseal of the source's secret = %q, %v; want %q", got, err, secret)
				case !tc.unsealOK && err == nil:
					t.Errorf("the source's secret unsealed in %s: %q", tc.vm, got)
				case !tc.unsealOK && !errors.As(err, &ce):
					t.Errorf("unseal in %s failed for another reason than the TPM: %v", tc.vm, err)
				}
			})
		}
	})
}

// TestBulkTPMEnableDisable switches the TPMs of 22 VMs, two of them broken
// (a damaged vm.json, a bundle that was moved away): every other VM
// succeeds, the two are reported with reasons, the exit status is non-zero
// and --json parses.
func TestBulkTPMEnableDisable(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := qemutest.ShortTempDir(t)
	h := newVMHost(t, dir)
	const n = 22
	var names []string
	for i := range n {
		names = append(names, fmt.Sprintf("bulk%02d", i))
	}
	// Creating a VM manufactures a TPM in-process; a few at once.
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for _, name := range names {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			if _, errOut, err := h.run(ctx, "vm", "create", name, "--os", "linux", "--tpm", "--no-disk"); err != nil {
				t.Errorf("vm create %s: %v\n%s", name, err, errOut)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	vms := h.list(ctx)
	damaged, moved := names[5], names[17]
	if err := os.WriteFile(filepath.Join(vms[damaged].Path, "vm.json"), []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(vms[moved].Path, filepath.Join(dir, "moved-away")); err != nil {
		t.Fatal(err)
	}
	broken := map[string]string{damaged: "is damaged", moved: "not a VM bundle"}

	check := func(t *testing.T, results []map[string]any, want string) {
		t.Helper()
		if len(results) != n {
			t.Fatalf("%d results, want %d", len(results), n)
		}
		for _, r := range results {
			name, _ := r["vm"].(string)
			ok, _ := r["ok"].(bool)
			reason, _ := r["error"].(string)
			if why, isBroken := broken[name]; isBroken {
				if ok || !strings.Contains(reason, why) {
					t.Errorf("%s: ok=%v error=%q; want a failure saying %q", name, ok, reason, why)
				}
				continue
			}
			if !ok {
				t.Errorf("%s failed: %s", name, reason)
			}
		}
		now := h.with(t).list(ctx)
		for _, name := range names {
			if _, isBroken := broken[name]; !isBroken && now[name].TPM != want {
				t.Errorf("%s: TPM %q after the bulk operation, want %q", name, now[name].TPM, want)
			}
		}
	}

	t.Run("disable --all --json", func(t *testing.T) {
		h := h.with(t)
		out, errOut, err := h.run(ctx, "tpm", "disable", "--all", "--json")
		if err == nil {
			t.Errorf("exit status 0 with two broken VMs; stderr:\n%s", errOut)
		}
		var results []map[string]any
		if err := json.Unmarshal([]byte(out), &results); err != nil {
			t.Fatalf("--json output does not parse: %v\n%s", err, out)
		}
		check(t, results, "disabled")
	})
	t.Run("enable VM...", func(t *testing.T) {
		h := h.with(t)
		out, _, err := h.run(ctx, append([]string{"tpm", "enable"}, names...)...)
		if err == nil {
			t.Error("exit status 0 with two broken VMs")
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != n+1 {
			t.Fatalf("%d output lines, want one per VM and a summary:\n%s", len(lines), out)
		}
		if lines[n] != fmt.Sprintf("%d ok, 2 failed", n-2) {
			t.Errorf("summary %q, want \"%d ok, 2 failed\"", lines[n], n-2)
		}
		var results []map[string]any
		for _, l := range lines[:n] {
			name, rest, _ := strings.Cut(l, ": ")
			reason, failed := strings.CutPrefix(rest, "failed: ")
			if !failed && !strings.HasPrefix(rest, "ok") {
				t.Errorf("line %q is neither ok nor failed", l)
			}
			results = append(results, map[string]any{"vm": name, "ok": !failed, "error": reason})
		}
		check(t, results, "enabled")
	})
}
