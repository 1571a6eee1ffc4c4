package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// TestVMUntrustedBundle: a bundle from elsewhere whose vm.json smuggles
// QEMU options or a host file is refused by vm register and, edited after
// registration, by vm start, each with a clear error and nothing in the
// bundle changed; a disk size that qemu-img would read as an option is
// refused; vm delete keeps the files vtpm did not make.
func TestVMUntrustedBundle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := qemutest.ShortTempDir(t)
	a := newVMHost(t, filepath.Join(dir, "a"))
	a.must(ctx, "vm", "create", "src", "--os", "linux", "--tpm", "--disk-size", "1M")
	src := a.list(ctx)["src"].Path

	for _, tc := range []struct {
		name   string
		change func(m map[string]any)
		want   []string
	}{
		{"comma in name", func(m map[string]any) { m["name"] = "web,debug-threads=on" },
			[]string{`name "web,debug-threads=on"`, "letters, digits"}},
		{"comma in disk path", func(m map[string]any) {
			m["disks"] = []any{map[string]any{"path": "disk.qcow2,file.filename=/etc/shadow", "format": "qcow2"}}
		}, []string{"disks[0].path", "may not contain a comma"}},
		{"device model", func(m map[string]any) {
			m["tpm"] = map[string]any{"enabled": true, "device": "tpm-crb,tpmdev=tpm0 -device virtio-9p-pci"}
		}, []string{"tpm.device", "want tpm-crb or tpm-tis"}},
		{"disk outside the bundle", func(m map[string]any) {
			m["disks"] = []any{map[string]any{"path": "/etc/shadow", "format": "raw"}}
		}, []string{"disks[0].path /etc/shadow is outside the VM's bundle", "`vtpm host allow-path /etc/shadow`"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newVMHost(t, filepath.Join(qemutest.ShortTempDir(t), "b"))
			bundle := filepath.Join(qemutest.ShortTempDir(t), "bundle")
			if out, err := exec.Command("cp", "-a", src, bundle).CombinedOutput(); err != nil {
				t.Fatalf("cp -a: %v\n%s", err, out)
			}
			// Registered while intact, then edited: vm start reads it again.
			b.must(ctx, "vm", "register", bundle, "--name", "late")
			editConfig(t, bundle, tc.change)
			before := treeHash(t, bundle)
			for _, args := range [][]string{{"vm", "register", bundle}, {"vm", "start", "late"}} {
				out, errOut, err := b.run(ctx, args...)
				if err == nil {
					b.run(ctx, "vm", "stop", "late", "--timeout", "0")
					t.Fatalf("vtpm %s succeeded, want a refusal:\n%s", strings.Join(args, " "), out)
				}
				for _, w := range tc.want {
					if !strings.Contains(errOut, w) {
						t.Errorf("vtpm %s: error does not say %q:\n%s", strings.Join(args, " "), w, errOut)
					}
				}
			}
			if after := treeHash(t, bundle); after != before {
				t.Error("the refused bundle changed on disk")
			}
		})
	}

	t.Run("qemu-img option as disk size", func(t *testing.T) {
		h := a.with(t)
		_, errOut, err := h.run(ctx, "vm", "create", "x", "--os", "linux", "--disk-size=-obacking_file=/etc/hostname,backing_fmt=raw")
		if err == nil || !strings.Contains(errOut, "--disk-size") {
			t.Errorf("vm create with a qemu-img option as its disk size: %v\n%s", err, errOut)
		}
		if _, ok := h.list(ctx)["x"]; ok {
			t.Error("the refused VM was registered")
		}
		if _, err := os.Stat(filepath.Join(a.home, "vms", "x")); err == nil {
			t.Error("the refused VM left a bundle")
		}
		for _, args := range [][]string{{"--disk-size", "0"}, {"--cpus", "-1", "--no-disk"}, {"--memory", "abc", "--no-disk"}, {"--kernel", filepath.Join(dir, "nope"), "--no-disk"}} {
			if _, errOut, err := h.run(ctx, append([]string{"vm", "create", "x", "--os", "linux"}, args...)...); err == nil || !strings.Contains(errOut, args[0]) {
				t.Errorf("vm create %v: %v; want a refusal naming %s:\n%s", args, err, args[0], errOut)
			}
		}
	})

	t.Run("vm delete keeps user files", func(t *testing.T) {
		h := a.with(t)
		notes := filepath.Join(src, "NOTES.txt")
		if err := os.WriteFile(notes, []byte("mine"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, errOut, err := h.run(ctx, "vm", "delete", "src", "--delete-tpm")
		if err == nil || !strings.Contains(errOut, "--yes") {
			t.Errorf("vm delete --delete-tpm without a terminal or --yes: %v\n%s", err, errOut)
		}
		out := h.must(ctx, "vm", "delete", "src")
		if !strings.Contains(out, "NOTES.txt") {
			t.Errorf("vm delete does not say what it kept:\n%s", out)
		}
		if b, err := os.ReadFile(notes); err != nil || string(b) != "mine" {
			t.Errorf("the user's file: %q, %v", b, err)
		}
		for _, f := range []string{"vm.json", "OVMF_VARS.fd", "disk.qcow2", "tpm"} {
			if _, err := os.Stat(filepath.Join(src, f)); err == nil {
				t.Errorf("%s is still in the bundle", f)
			}
		}
		if _, ok := h.list(ctx)["src"]; ok {
			t.Error("the deleted VM is still registered")
		}
	})
}

// TestVMQEMUConfined: run as root, vm start runs QEMU as an unprivileged
// user under its seccomp sandbox, and the guest still boots with its TPM.
func TestVMQEMUConfined(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "needs root: only root's QEMU drops privileges")
	}
	qemutest.SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	h := newVMHost(t, qemutest.ShortTempDir(t))
	img := guestImage(ctx, t)
	h.must(ctx, createArgs(img, "confined", "linux", "--tpm")...)
	g := h.startVM(ctx, t, "confined")
	var vms []struct {
		Name    string
		QEMUPid int `json:"qemu_pid"`
	}
	if err := json.Unmarshal([]byte(h.must(ctx, "vm", "list", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	if len(vms) != 1 || vms[0].QEMUPid <= 0 {
		t.Fatalf("vm list: %+v, want one VM with a QEMU pid", vms)
	}
	status, err := os.ReadFile("/proc/" + strconv.Itoa(vms[0].QEMUPid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(status), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	for _, id := range strings.Fields(fields["Uid"]) {
		if id == "0" {
			t.Errorf("QEMU runs with Uid: %s, want no root uid", fields["Uid"])
		}
	}
	if fields["Seccomp"] != "2" {
		t.Errorf("QEMU has Seccomp: %s, want 2 (filter)", fields["Seccomp"])
	}
	if v := g.must(ctx, t, "cat /sys/class/tpm/tpm0/tpm_version_major"); v != "2" {
		t.Errorf("guest TPM version %q, want 2", v)
	}
	g.ek(ctx, t)
	h.must(ctx, "vm", "stop", "confined", "--timeout", "1s")
}

func editConfig(t *testing.T, bundle string, change func(m map[string]any)) {
	t.Helper()
	p := filepath.Join(bundle, "vm.json")
	var m map[string]any
	if err := json.Unmarshal(mustRead(t, p), &m); err != nil {
		t.Fatal(err)
	}
	change(m)
	b, _ := json.Marshal(m)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// treeHash hashes the names, modes and contents of everything under dir.
func treeHash(t *testing.T, dir string) string {
	t.Helper()
	h := sha256.New()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		h.Write([]byte(rel + "\x00" + info.Mode().String() + "\x00"))
		if d.Type().IsRegular() {
			h.Write(mustRead(t, p))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
