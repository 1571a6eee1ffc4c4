package vm

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

// validConfig is a vm.json every check accepts.
func validConfig() map[string]any {
	return map[string]any{
		"format": 1, "name": "guest", "uuid": "0b6f0f7e-8d5c-4c39-9d3e-5c1f3b2f7a10", "os": "linux",
		"firmware": "uefi", "secure_boot": true, "memory": "1G", "cpus": 2,
		"disks": []any{map[string]any{"path": "disk.qcow2", "format": "qcow2"}},
		"tpm":   map[string]any{"enabled": true, "device": "tpm-crb"},
	}
}

func marshal(t testing.TB, m map[string]any) []byte {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseConfig(t *testing.T) {
	dir := t.TempDir()
	if err := os.Symlink("/etc/hostname", filepath.Join(dir, "escape.qcow2")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "inside.qcow2"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("inside.qcow2", filepath.Join(dir, "link.qcow2")); err != nil {
		t.Fatal(err)
	}
	host := &HostConfig{AllowedPaths: []string{"/srv/images", "/dev/sdz"}}
	disk := func(path, format string, pt bool) func(m map[string]any) {
		return func(m map[string]any) {
			m["disks"] = []any{map[string]any{"path": path, "format": format, "passthrough": pt}}
		}
	}
	set := func(k string, v any) func(m map[string]any) { return func(m map[string]any) { m[k] = v } }
	for _, tc := range []struct {
		name   string
		change func(m map[string]any)
		kind   error  // nil: accepted
		field  string // the field a ConfigError names
	}{
		{"valid", func(map[string]any) {}, nil, ""},
		{"comma in name", set("name", "web,debug-threads=on"), errdefs.ErrInvalidArgument, "name"},
		{"name is a path", set("name", "../etc"), errdefs.ErrInvalidArgument, "name"},
		{"unknown OS", set("os", "dos"), errdefs.ErrInvalidArgument, "os"},
		{"unknown firmware", set("firmware", "efi"), errdefs.ErrInvalidArgument, "firmware"},
		{"memory not a size", set("memory", "abc"), errdefs.ErrInvalidArgument, "memory"},
		{"memory with an option", set("memory", "1G,slots=4,maxmem=1T"), errdefs.ErrInvalidArgument, "memory"},
		{"memory too small", set("memory", "1M"), errdefs.ErrInvalidArgument, "memory"},
		{"memory too large", set("memory", "5T"), errdefs.ErrInvalidArgument, "memory"},
		{"no CPUs", set("cpus", 0), errdefs.ErrInvalidArgument, "cpus"},
		{"negative CPUs", set("cpus", -1), errdefs.ErrInvalidArgument, "cpus"},
		{"too many CPUs", set("cpus", MaxCPUs+1), errdefs.ErrInvalidArgument, "cpus"},
		{"TPM device model injection", set("tpm", map[string]any{"enabled": true, "device": "tpm-crb,id=x -device virtio-9p-pci"}), errdefs.ErrInvalidArgument, "tpm.device"},
		{"TPM device not a TPM", set("tpm", map[string]any{"enabled": true, "device": "vfio-pci"}), errdefs.ErrInvalidArgument, "tpm.device"},
		{"tpm-tis", set("tpm", map[string]any{"enabled": true, "device": "tpm-tis"}), nil, ""},
		{"disk format", disk("disk.qcow2", "vmdk", false), errdefs.ErrInvalidArgument, "disks[0].format"},
		{"comma in disk path", disk("disk.qcow2,file.driver=host_device,file.filename=/dev/sda", "qcow2", false), errdefs.ErrInvalidArgument, "disks[0].path"},
		{"disk path leaves the bundle", disk("../other/disk.qcow2", "qcow2", false), errdefs.ErrInvalidArgument, "disks[0].path"},
		{"disk outside the bundle", disk("/etc/shadow", "raw", false), errdefs.ErrPermissionDenied, ""},
		{"disk symlink out of the bundle", disk("escape.qcow2", "raw", false), errdefs.ErrInvalidArgument, "disks[0].path"},
		{"disk symlink inside the bundle", disk("link.qcow2", "qcow2", false), nil, ""},
		{"disk the host allows", disk("/srv/images/a.qcow2", "qcow2", false), nil, ""},
		{"disk beside what the host allows", disk("/srv/images2/a.qcow2", "qcow2", false), errdefs.ErrPermissionDenied, ""},
		{"unclean absolute disk path", disk("/srv/images/../../etc/shadow", "raw", false), errdefs.ErrInvalidArgument, "disks[0].path"},
		{"passthrough the host allows", disk("/dev/sdz", "raw", true), nil, ""},
		{"passthrough not allowed", disk("/dev/sda", "raw", true), errdefs.ErrPermissionDenied, ""},
		{"relative passthrough", disk("sda", "raw", true), errdefs.ErrInvalidArgument, "disks[0].path"},
		{"path as an option", disk("-obacking_file=/etc/hostname", "qcow2", false), errdefs.ErrInvalidArgument, "disks[0].path"},
		{"kernel outside the bundle", set("kernel", "/boot/vmlinuz"), errdefs.ErrPermissionDenied, ""},
		{"kernel the host allows", set("kernel", "/srv/images/vmlinuz"), nil, ""},
		{"initrd without kernel", set("initrd", "initrd.img"), errdefs.ErrInvalidArgument, "initrd"},
		{"control character in append", set("append", "quiet\nroot=/dev/sda"), errdefs.ErrInvalidArgument, "append"},
		{"isolation", set("isolation", "none"), errdefs.ErrInvalidArgument, "isolation"},
		{"tpm_user not a user", set("tpm_user", "tss;id"), errdefs.ErrInvalidArgument, "tpm_user"},
		{"tpm_user root", set("tpm_user", "root"), errdefs.ErrInvalidArgument, "tpm_user"},
		{"tpm_user uid 0", set("tpm_user", "0"), errdefs.ErrInvalidArgument, "tpm_user"},
		{"qemu_user root", set("qemu_user", "root"), errdefs.ErrInvalidArgument, "qemu_user"},
		{"qemu_user", set("qemu_user", "libvirt-qemu"), nil, ""},
		{"unknown field", set("devices", []any{"virtio-9p-pci"}), errdefs.ErrDataLoss, ""},
		{"nil UUID", set("uuid", uuid.Nil.String()), errdefs.ErrDataLoss, ""},
		{"format", set("format", 2), errdefs.ErrFailedPrecondition, ""},
		{"Secure Boot on BIOS", set("firmware", "bios"), errdefs.ErrInvalidArgument, "secure_boot"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := validConfig()
			tc.change(m)
			c, err := ParseConfig(marshal(t, m), dir, host)
			if tc.kind == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if c.Name != m["name"] {
					t.Errorf("name %q", c.Name)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			if errdefs.KindOf(err) != tc.kind {
				t.Errorf("%v: kind %v, want %v", err, errdefs.KindOf(err), tc.kind)
			}
			var ce *ConfigError
			if tc.field != "" && (!errors.As(err, &ce) || ce.Field != tc.field) {
				t.Errorf("%v: want a ConfigError on field %s", err, tc.field)
			}
			var pe *PathNotAllowedError
			if errors.As(err, &pe) {
				want := errdefs.Do(errdefs.ActionHostAllowPath, "path", pe.Path)
				rs := errdefs.Remedies(err)
				if len(rs) != 1 || rs[0].Action != want.Action || rs[0].Args["path"] != pe.Path {
					t.Errorf("remedies %+v, want one allowing %s", rs, pe.Path)
				}
			}
		})
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		unit int64
		want int64
		ok   bool
	}{
		{"20G", 1, 20 * GiB, true},
		{"512M", MiB, 512 * MiB, true},
		{"512", MiB, 512 * MiB, true},
		{"512", 1, 512, true},
		{"1KiB", 1, KiB, true},
		{"4tb", 1, 4 * TiB, true},
		{"0", 1, 0, true},
		{"", 1, 0, false},
		{"abc", 1, 0, false},
		{"-1G", 1, 0, false},
		{"+1G", 1, 0, false},
		{"1.5G", 1, 0, false},
		{"-obacking_file=/etc/hostname,backing_fmt=raw", 1, 0, false},
		{"1G,x", 1, 0, false},
		{"99999999999999999999", 1, 0, false},
		{"9999999999T", 1, 0, false},
	} {
		got, err := ParseSize(tc.in, tc.unit)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
	if _, err := ParseDiskSize("0"); err == nil {
		t.Error("a disk of size 0 is accepted")
	}
}

// TestCreateRefusesBadValues: what a create is given is checked before
// anything is made; a size can never reach qemu-img as an option.
func TestCreateRefusesBadValues(t *testing.T) {
	h := testHost(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		o    CreateOptions
		want string
	}{
		{"qemu-img option as disk size", CreateOptions{DiskSize: "-obacking_file=/etc/hostname,backing_fmt=raw"}, "disk size"},
		{"zero disk size", CreateOptions{DiskSize: "0"}, "out of range"},
		{"negative CPUs", CreateOptions{CPUs: -1, NoDisk: true}, "CPUs"},
		{"memory not a size", CreateOptions{Memory: "abc", NoDisk: true}, "memory"},
		{"missing kernel", CreateOptions{Kernel: filepath.Join(dir, "vmlinuz"), NoDisk: true}, "--kernel"},
		{"comma in a disk path", CreateOptions{Disk: "/dev/null,format=qcow2"}, "disk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.o.Name, tc.o.OS = strings.ReplaceAll(tc.name, " ", "-"), Linux
			_, err := h.Create(tc.o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Create: %v; want a refusal about %s", err, tc.want)
			}
			if _, err := os.Stat(filepath.Join(h.VMsDir(), tc.o.Name)); err == nil {
				t.Error("refused VM left its bundle directory")
			}
			if _, err := os.Stat("/etc/hostname.qcow2"); err == nil {
				t.Error("a disk appeared beside /etc/hostname")
			}
		})
	}
}

// TestCreateAllowsItsPaths: paths outside the bundle given to create by the
// local administrator join the host's allow list, so the VM opens.
func TestCreateAllowsItsPaths(t *testing.T) {
	h := testHost(t)
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(kernel, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := h.Create(CreateOptions{Name: "direct", OS: Linux, Kernel: kernel, NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(res.Notes, "\n"), kernel) {
		t.Errorf("notes %q do not say the kernel is now allowed", res.Notes)
	}
	hc, err := h.HostConfig()
	if err != nil || !hc.Allows(kernel) {
		t.Fatalf("host config %+v, %v: the kernel is not allowed", hc, err)
	}
	if _, err := h.Open("direct"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.DisallowPaths(kernel); err != nil {
		t.Fatal(err)
	}
	var pe *PathNotAllowedError
	if _, err := h.Open("direct"); !errors.As(err, &pe) || pe.Path != kernel {
		t.Errorf("Open after disallowing the kernel: %v; want a PathNotAllowedError for %s", err, kernel)
	}
}

// TestInjectedBundleRefused: a bundle whose vm.json was edited to smuggle
// QEMU options or host files is refused by register (another host) and by
// every reader on the host that has it registered, and nothing in the
// bundle changes.
func TestInjectedBundleRefused(t *testing.T) {
	h := testHost(t)
	res, err := h.Create(CreateOptions{Name: "orig", OS: Linux, TPM: yes(), DiskSize: "1M"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		change func(m map[string]any)
		kind   error
	}{
		{"comma in name", func(m map[string]any) { m["name"] = "x,debug-threads=on" }, errdefs.ErrInvalidArgument},
		{"comma in disk path", func(m map[string]any) {
			m["disks"] = []any{map[string]any{"path": "disk.qcow2,file=/etc/shadow", "format": "qcow2"}}
		}, errdefs.ErrInvalidArgument},
		{"device model", func(m map[string]any) {
			m["tpm"] = map[string]any{"enabled": true, "device": "tpm-crb,tpmdev=tpm0 -device virtio-9p-pci"}
		}, errdefs.ErrInvalidArgument},
		{"disk outside the bundle", func(m map[string]any) {
			m["disks"] = []any{map[string]any{"path": "/etc/shadow", "format": "raw"}}
		}, errdefs.ErrPermissionDenied},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bundle := filepath.Join(t.TempDir(), "bundle")
			if out, err := exec.Command("cp", "-a", res.VM.Dir, bundle).CombinedOutput(); err != nil {
				t.Fatalf("cp: %v\n%s", err, out)
			}
			var m map[string]any
			if err := json.Unmarshal(mustReadFile(t, filepath.Join(bundle, ConfigFile)), &m); err != nil {
				t.Fatal(err)
			}
			tc.change(m)
			if err := os.WriteFile(filepath.Join(bundle, ConfigFile), marshal(t, m), 0o644); err != nil {
				t.Fatal(err)
			}
			before := hashTree(t, bundle)

			other := NewRegistry(t.TempDir(), h.Keys)
			_, err := other.Register(bundle, "")
			if errdefs.KindOf(err) != tc.kind {
				t.Errorf("register: %v; want a refusal of kind %v", err, tc.kind)
			}
			if entries, _ := other.Entries(); len(entries) != 0 {
				t.Errorf("refused bundle registered: %+v", entries)
			}
			// Edited after it was registered: refused when opened to start.
			if err := other.update(func(r *registry) error {
				return r.add(Entry{Name: "late", UUID: res.VM.Config.UUID, Path: bundle})
			}); err != nil {
				t.Fatal(err)
			}
			if _, err := other.Open("late"); errdefs.KindOf(err) != tc.kind {
				t.Errorf("open to start: %v; want a refusal of kind %v", err, tc.kind)
			}
			if after := hashTree(t, bundle); after != before {
				t.Errorf("the bundle changed:\nbefore %s\nafter  %s", before, after)
			}
		})
	}
}

func mustReadFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// hashTree hashes the names, modes and contents of everything under dir.
func hashTree(t *testing.T, dir string) string {
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
			h.Write(mustReadFile(t, p))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// FuzzParseConfig: whatever vm.json holds, a config that parses names
// only bounded values and paths inside the bundle or allowed by the host,
// and its QEMU command line has exactly the options vtpm writes.
func FuzzParseConfig(f *testing.F) {
	f.Add(marshal(f, validConfig()))
	for _, kv := range [][2]any{
		{"name", "a,b"}, {"memory", "-1"}, {"cpus", 1 << 40},
		{"disks", []any{map[string]any{"path": "a,,b", "format": "raw"}}},
		{"kernel", "/srv/images/k,initrd=/etc/shadow"}, {"append", "a,b c=d"},
		{"tpm", map[string]any{"enabled": true, "device": "tpm-tis,"}},
	} {
		m := validConfig()
		m[kv[0].(string)] = kv[1]
		f.Add(marshal(f, m))
	}
	dir := f.TempDir()
	host := &HostConfig{AllowedPaths: []string{"/srv/images"}}
	r := runPaths{Dir: "/run/0123456789abcdef", QMP: "/run/v,x/qmp.sock", TPMSock: "/run/v,x/tpm/tpm.sock"}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b, dir, host)
		if err != nil {
			return
		}
		if validName(c.Name) != nil || CheckCPUs(c.CPUs) != nil {
			t.Fatalf("accepted name %q, cpus %d", c.Name, c.CPUs)
		}
		if _, err := ParseMemory(c.Memory); err != nil {
			t.Fatalf("accepted memory %q", c.Memory)
		}
		paths := []string{c.Kernel, c.Initrd}
		for _, d := range c.Disks {
			paths = append(paths, d.Path)
		}
		for _, p := range paths {
			if p == "" {
				continue
			}
			if filepath.IsAbs(p) && !host.Allows(p) || !filepath.IsAbs(p) && !filepath.IsLocal(p) || strings.HasPrefix(p, "-") {
				t.Fatalf("accepted path %q", p)
			}
		}
		args, err := qemuArgs(&VM{Dir: dir, Config: c}, r, "tcg", "file,id=ser0,path="+optEscape("/b,x/serial.log"), pathIO{})
		if err != nil {
			t.Fatalf("qemuArgs: %v", err)
		}
		for i := 0; i+1 < len(args); i++ {
			want, ok := optionKeys[args[i]]
			if !ok {
				continue
			}
			keys := splitKeys(args[i+1])
			if args[i] == "-drive" {
				if k := strings.Join(keys, ","); !driveShapes[k] {
					t.Fatalf("%s %s: keys %s", args[i], args[i+1], k)
				}
				continue
			}
			if want == nil { // -chardev: known keys, each once
				seen := map[string]bool{}
				for _, k := range keys {
					if !chardevKeys[k] || seen[k] {
						t.Fatalf("%s %s: key %q", args[i], args[i+1], k)
					}
					seen[k] = true
				}
				continue
			}
			if strings.Join(keys, ",") != strings.Join(want, ",") {
				t.Fatalf("%s %s: keys %v, want %v", args[i], args[i+1], keys, want)
			}
		}
	})
}

// optionKeys are the keys vtpm writes in each option string (nil: see
// driveShapes and chardevKeys).
var optionKeys = map[string][]string{
	"-name":    {"guest"},
	"-drive":   nil,
	"-chardev": nil,
	"-tpmdev":  {"emulator", "id", "chardev"},
	"-device":  {"tpm-crb|tpm-tis", "tpmdev"},
}

var driveShapes = map[string]bool{
	"if,format,unit,readonly,file":                   true, // firmware code
	"file.auto-read-only,if,format,unit,file":        true, // variable store
	"file.auto-read-only,if,index,format,file":       true, // disk
	"file.auto-read-only,if,index,format,file,cache": true, // passthrough disk
}

var chardevKeys = map[string]bool{"file": true, "socket": true, "stdio": true, "id": true, "path": true,
	"fd": true, "server": true, "wait": true, "logfile": true, "signal": true}

// splitKeys returns the keys of a QEMU option string as QEMU splits it: at
// single commas (a doubled comma is part of a value); a part without '='
// counts as its whole text, and a TPM model as "tpm-crb|tpm-tis".
func splitKeys(s string) []string {
	var keys []string
	var part strings.Builder
	flush := func() {
		p := part.String()
		k, _, _ := strings.Cut(p, "=")
		if k == "tpm-crb" || k == "tpm-tis" {
			k = "tpm-crb|tpm-tis"
		}
		keys = append(keys, k)
		part.Reset()
	}
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				part.WriteString(",,")
				i++
				continue
			}
			flush()
			continue
		}
		part.WriteByte(s[i])
	}
	flush()
	return keys
}
