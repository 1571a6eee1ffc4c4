package vm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/hostcheck"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/seal"
	"vtpm/internal/testutil"
)

// testHost is a Registry on a temporary data root with its own keystore.
func testHost(t *testing.T) *Registry {
	t.Helper()
	if _, err := os.Stat(filepath.Join(hostcheck.FirmwareDir, hostcheck.OVMFVarsMS)); err != nil {
		testutil.Missing(t, "OVMF is not installed: %v", err)
	}
	root := t.TempDir()
	return NewRegistry(root, func() (*keybroker.Broker, error) {
		return keybroker.Open(root, keystore.Options{HostTPM: "none"})
	})
}

func yes() *bool { b := true; return &b }
func no() *bool  { b := false; return &b }

func TestCreateRules(t *testing.T) {
	h := testHost(t)
	for _, tc := range []struct {
		name     string
		o        CreateOptions
		rule     string // refusal expected
		sb, tpm  bool
		firmware Firmware
	}{
		{name: "windows11 defaults", o: CreateOptions{OS: Windows11}, sb: true, tpm: true, firmware: UEFI},
		{name: "windows11 BIOS", o: CreateOptions{OS: Windows11, Firmware: BIOS}, rule: "windows11-needs-uefi"},
		{name: "windows11 without TPM", o: CreateOptions{OS: Windows11, TPM: no()}, rule: "windows11-needs-tpm"},
		{name: "windows11 passthrough boot disk", o: CreateOptions{OS: Windows11, Passthrough: []string{"/dev/null"}}, rule: "windows11-needs-tpm"},
		{name: "linux plain", o: CreateOptions{OS: Linux}, firmware: UEFI},
		{name: "linux with TPM gets Secure Boot", o: CreateOptions{OS: Linux, TPM: yes()}, sb: true, tpm: true, firmware: UEFI},
		{name: "linux BIOS with TPM", o: CreateOptions{OS: Linux, Firmware: BIOS, TPM: yes()}, rule: "tpm-needs-uefi"},
		{name: "windows10 BIOS", o: CreateOptions{OS: Windows10, Firmware: BIOS}, firmware: BIOS},
		{name: "passthrough with TPM", o: CreateOptions{OS: Other, Passthrough: []string{"/dev/null"}, TPM: yes()}, rule: "tpm-passthrough"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.o.Name = strings.NewReplacer(" ", "-").Replace(tc.name)
			tc.o.NoDisk = true
			res, err := h.Create(tc.o)
			if tc.rule != "" {
				if !IsRule(err, tc.rule) {
					t.Fatalf("Create: %v; want a refusal by rule %s", err, tc.rule)
				}
				if _, err := h.Find(tc.o.Name); !errors.Is(err, ErrNotFound) {
					t.Errorf("refused VM is registered: %v", err)
				}
				if _, err := os.Stat(filepath.Join(h.VMsDir(), tc.o.Name)); err == nil {
					t.Error("refused VM left its bundle directory")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			c := res.VM.Config
			if c.SecureBoot != tc.sb || c.TPMEnabled() != tc.tpm || c.Firmware != tc.firmware {
				t.Errorf("Secure Boot %v, TPM %v, firmware %s; want %v, %v, %s", c.SecureBoot, c.TPMEnabled(), c.Firmware, tc.sb, tc.tpm, tc.firmware)
			}
			if got := seal.HasBlobs(res.VM.TPMDir()); got != tc.tpm {
				t.Errorf("manufactured TPM state present: %v, want %v", got, tc.tpm)
			}
			vars, err := os.ReadFile(filepath.Join(res.VM.Dir, VarsFile))
			if c.Firmware == UEFI {
				_, tmpl := firmwareFiles(c)
				want, _ := os.ReadFile(tmpl)
				if err != nil || !bytes.Equal(vars, want) {
					t.Errorf("variable store is not a copy of %s: %v", tmpl, err)
				}
			} else if err == nil {
				t.Error("a BIOS VM has a UEFI variable store")
			}
		})
	}
}

func TestAddTPMTurnsSecureBootOn(t *testing.T) {
	h := testHost(t)
	res, err := h.Create(CreateOptions{Name: "plain", OS: Linux, NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	notes, err := h.AddTPM(res.VM)
	if err != nil {
		t.Fatal(err)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], "Secure Boot is now on") {
		t.Errorf("notes %q: want one saying Secure Boot is now on", notes)
	}
	v, err := h.Open("plain")
	if err != nil {
		t.Fatal(err)
	}
	if !v.Config.SecureBoot || !v.Config.TPMEnabled() {
		t.Errorf("after AddTPM: Secure Boot %v, TPM %v", v.Config.SecureBoot, v.Config.TPMEnabled())
	}
	vars, _ := os.ReadFile(filepath.Join(v.Dir, VarsFile))
	ms, _ := os.ReadFile(filepath.Join(hostcheck.FirmwareDir, hostcheck.OVMFVarsMS))
	if !bytes.Equal(vars, ms) {
		t.Error("the variable store is not the one with Microsoft's keys")
	}
	if _, err := os.Stat(filepath.Join(v.Dir, VarsFile+".before-secureboot")); err != nil {
		t.Errorf("old variable store not kept: %v", err)
	}
}

func TestQEMUArgs(t *testing.T) {
	r := runPaths{Dir: "/run/x", QMP: "/run/x/qmp.sock", TPMSock: "/run/x/tpm.sock", QEMUPid: "/run/x/qemu.pid"}
	base := Config{Name: "v", OS: Linux, Firmware: UEFI, Memory: "1G", CPUs: 1, Disks: []Disk{{Path: "disk.qcow2", Format: "qcow2"}}}
	for _, tc := range []struct {
		name      string
		change    func(c *Config)
		accel     string
		want, not []string
	}{
		{"uefi", func(c *Config) {}, "tcg",
			[]string{"if=pflash,format=raw,unit=0,readonly=on,file=" + filepath.Join(hostcheck.FirmwareDir, hostcheck.OVMFCode), "file=/b/v/disk.qcow2", "-accel tcg"},
			[]string{"smm=on", "-tpmdev", "secboot", "-cpu host"}},
		{"secure boot with TPM", func(c *Config) { c.SecureBoot = true; c.TPM = &TPM{Enabled: true, Device: "tpm-crb"} }, "kvm",
			[]string{"q35,smm=on", hostcheck.OVMFCodeSecure, "property=secure,value=on", "-tpmdev emulator,id=tpm0,chardev=chrtpm", "-device tpm-crb,tpmdev=tpm0", "path=/run/x/tpm.sock", "-cpu host"},
			nil},
		{"tpm-tis", func(c *Config) { c.SecureBoot = true; c.TPM = &TPM{Enabled: true, Device: "tpm-tis"} }, "tcg",
			[]string{"-device tpm-tis,tpmdev=tpm0"}, nil},
		{"disabled TPM is detached", func(c *Config) { c.SecureBoot = true; c.TPM = &TPM{Enabled: false, Device: "tpm-crb"} }, "tcg",
			[]string{hostcheck.OVMFCodeSecure}, []string{"-tpmdev", "tpm.sock"}},
		{"bios", func(c *Config) { c.Firmware = BIOS }, "tcg", nil, []string{"pflash"}},
		{"direct kernel boot", func(c *Config) { c.Kernel, c.Initrd, c.Append = "/k", "/i", "quiet" }, "tcg",
			[]string{"-kernel /k", "-initrd /i", "-append console=ttyS0 quiet"}, []string{"-vga"}},
		{"passthrough", func(c *Config) { c.Disks = []Disk{{Path: "/dev/sdz", Format: "raw", Passthrough: true}} }, "tcg",
			[]string{"format=raw,file=/dev/sdz,cache=none"}, nil},
		{"commas are doubled in option strings", func(c *Config) {
			c.Disks = []Disk{{Path: "/srv/a,format=raw,file=/etc/shadow", Format: "qcow2"}}
			c.Kernel = "/k,x"
		}, "tcg",
			[]string{"format=qcow2,file=/srv/a,,format=raw,,file=/etc/shadow ", "-kernel /k,x "}, []string{"file=/srv/a,format"}},
		{"kernel inside the bundle", func(c *Config) { c.Kernel, c.Initrd = "boot/vmlinuz", "boot/initrd" }, "tcg",
			[]string{"-kernel /b/v/boot/vmlinuz", "-initrd /b/v/boot/initrd"}, nil},
		{"sandboxed", func(c *Config) {}, "tcg",
			[]string{"-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny", "-m 1024M"}, []string{"-daemonize", "-runas"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			tc.change(&c)
			args, err := qemuArgs(&VM{Dir: "/b/v", Config: &c}, r, tc.accel, "file,id=ser0,path=/b/v/logs/serial.log", pathIO{})
			if err != nil {
				t.Fatal(err)
			}
			line := strings.Join(args, " ")
			for _, w := range tc.want {
				if !strings.Contains(line, w) {
					t.Errorf("QEMU command line lacks %q:\n%s", w, line)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(line, n) {
					t.Errorf("QEMU command line has %q:\n%s", n, line)
				}
			}
		})
	}
}

func TestRegister(t *testing.T) {
	h := testHost(t)
	res, err := h.Create(CreateOptions{Name: "orig", OS: Linux, NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	copied := filepath.Join(t.TempDir(), "copied")
	if out, err := exec.Command("cp", "-a", res.VM.Dir, copied).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
	clone := errdefs.Do(errdefs.ActionVMClone, "vm", "orig")
	if _, err := h.Register(copied, "other"); !errors.Is(err, ErrConflict) || !errors.Is(err, errdefs.ErrConflict) ||
		!slices.ContainsFunc(errdefs.Remedies(err), func(r errdefs.Remedy) bool { return r.Action == clone.Action && r.Args["vm"] == "orig" }) {
		t.Errorf("registering a copy with the same UUID: %v; want a conflict that points to vm clone", err)
	}
	other := NewRegistry(t.TempDir(), h.Keys)
	v, err := other.Register(copied, "renamed")
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := ReadConfig(copied, nil); c.Name != "renamed" || v.Config.UUID != res.VM.Config.UUID {
		t.Errorf("registered as %q with UUID %s; want renamed, %s", c.Name, v.Config.UUID, res.VM.Config.UUID)
	}
	if _, err := other.Register(copied, ""); !errors.Is(err, ErrConflict) {
		t.Errorf("registering the same bundle twice: %v; want a conflict", err)
	}
	if _, err := other.Unregister("renamed"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(copied, ConfigFile)); err != nil {
		t.Errorf("unregister removed the bundle: %v", err)
	}
}

// TestCloneCopyRekeys: a --tpm copy clone holds the same TPM blobs under a
// new TPM UUID and a new data key; the source's key does not open them.
func TestCloneCopyRekeys(t *testing.T) {
	h := testHost(t)
	res, err := h.Create(CreateOptions{Name: "src", OS: Linux, TPM: yes(), NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := h.Clone(res.VM, "dst", TPMCopy, "")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(cl.Warnings, func(n string) bool { return strings.Contains(n, "share one EK") }) {
		t.Errorf("warnings %q do not warn about the shared EK", cl.Warnings)
	}
	k, err := h.Keys()
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	load := func(dir string) (*keybroker.Opened, []byte) {
		t.Helper()
		o, err := k.OpenTPM(dir)
		if err != nil {
			t.Fatal(err)
		}
		s, err := o.Key.OpenStore(dir, seal.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		b, err := s.Load("permall")
		if err != nil {
			t.Fatal(err)
		}
		return o, b
	}
	so, sb := load(res.VM.TPMDir())
	do, db := load(cl.VM.TPMDir())
	if so.TPM == do.TPM {
		t.Errorf("the copy kept TPM UUID %s", so.TPM)
	}
	if so.Key.Equal(do.Key) {
		t.Error("the copy kept the source's data key")
	}
	if !bytes.Equal(sb, db) {
		t.Error("the copy's permanent state differs from the source's")
	}
	if s, err := so.Key.OpenStore(cl.VM.TPMDir(), seal.Options{}); err == nil {
		_, err = s.Load("permall")
		s.Close()
		if err == nil {
			t.Error("the source's data key opens the copy's state")
		}
	}
}

func TestDeleteKeepsTPMBackup(t *testing.T) {
	h := testHost(t)
	for _, tc := range []struct {
		name      string
		deleteTPM bool
	}{{"keep", false}, {"drop", true}} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := h.Create(CreateOptions{Name: tc.name, OS: Linux, TPM: yes(), NoDisk: true})
			if err != nil {
				t.Fatal(err)
			}
			del, err := h.Delete(res.VM, tc.deleteTPM)
			if err != nil {
				t.Fatal(err)
			}
			backup := del.Backup
			if _, err := os.Stat(res.VM.Dir); err == nil {
				t.Error("bundle still there")
			}
			if _, err := h.Find(tc.name); !errors.Is(err, ErrNotFound) {
				t.Errorf("still registered: %v", err)
			}
			if got := backup != "" && seal.HasBlobs(backup); got == tc.deleteTPM {
				t.Errorf("TPM backup at %q with state: %v; want %v", backup, got, !tc.deleteTPM)
			}
		})
	}
}

// TestDeleteKeepsUserFiles: vm delete removes what vtpm made and nothing
// else; a user's files keep the bundle directory.
func TestDeleteKeepsUserFiles(t *testing.T) {
	h := testHost(t)
	res, err := h.Create(CreateOptions{Name: "notes", OS: Linux, TPM: yes(), DiskSize: "1M"})
	if err != nil {
		t.Fatal(err)
	}
	dir := res.VM.Dir
	user := map[string]string{"NOTES.txt": "do not lose me", "isos/install.iso": "iso", "logs/mine.txt": "mine"}
	for rel, body := range user {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(dir, LogDir, "qemu.log"), []byte("log"), 0o600)
	del, err := h.Delete(res.VM, false)
	if err != nil {
		t.Fatal(err)
	}
	for rel, body := range user {
		if b, err := os.ReadFile(filepath.Join(dir, rel)); err != nil || string(b) != body {
			t.Errorf("user file %s: %q, %v; want it kept", rel, b, err)
		}
	}
	for _, rel := range []string{ConfigFile, VarsFile, diskName, TPMDir, filepath.Join(LogDir, "qemu.log")} {
		if _, err := os.Stat(filepath.Join(dir, rel)); err == nil {
			t.Errorf("%s is still in the bundle", rel)
		}
	}
	slices.Sort(del.Kept)
	if want := []string{filepath.Join(dir, "NOTES.txt"), filepath.Join(dir, "isos"), filepath.Join(dir, LogDir)}; !slices.Equal(del.Kept, want) {
		t.Errorf("kept %q, want %q", del.Kept, want)
	}
	if !seal.HasBlobs(del.Backup) {
		t.Errorf("no TPM backup at %q", del.Backup)
	}
	if _, err := h.Find("notes"); !errors.Is(err, ErrNotFound) {
		t.Errorf("still registered: %v", err)
	}
}

// TestWindows11KeepsItsTPM: the rule create applies holds for the ways a
// VM could lose its TPM later.
func TestWindows11KeepsItsTPM(t *testing.T) {
	h := testHost(t)
	res, err := h.Create(CreateOptions{Name: "win", OS: Windows11, NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.RemoveTPM(res.VM); !IsRule(err, "windows11-needs-tpm") {
		t.Errorf("tpm remove: %v; want a refusal by rule windows11-needs-tpm", err)
	}
	if _, err := h.Clone(res.VM, "bare", TPMNone, ""); !IsRule(err, "windows11-needs-tpm") {
		t.Errorf("clone --tpm none: %v; want a refusal by rule windows11-needs-tpm", err)
	}
	if _, err := h.Find("bare"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the refused clone is registered: %v", err)
	}
	v, err := h.Open("win")
	if err != nil {
		t.Fatal(err)
	}
	if !v.Config.TPMEnabled() || !seal.HasBlobs(v.TPMDir()) {
		t.Error("the VM lost its TPM")
	}
}

// TestUnregisterRefusesARunningVM: a running VM stays registered, and the
// refusal says to stop it.
func TestUnregisterRefusesARunningVM(t *testing.T) {
	h := testHost(t)
	res, err := h.Create(CreateOptions{Name: "web", OS: Linux, NoDisk: true})
	if err != nil {
		t.Fatal(err)
	}
	// A process whose command line names the run directory passes for QEMU.
	r := h.run(res.VM)
	qemu := exec.Command("sh", "-c", "sleep 60", filepath.Base(r.Dir))
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { qemu.Process.Kill(); qemu.Wait() }()
	// Until the child has exec'd, its command line is still this test's.
	cmdline := fmt.Sprintf("/proc/%d/cmdline", qemu.Process.Pid)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if b, _ := os.ReadFile(cmdline); bytes.Contains(b, []byte(filepath.Base(r.Dir))) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stand-in QEMU did not start")
		}
	}
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.QEMUPid, []byte(strconv.Itoa(qemu.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = h.Unregister("web")
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !hasRemedy(err, errdefs.ActionVMStop, "vm", "web") {
		t.Errorf("unregister a running VM: %v, remedies %+v; want a failed precondition with vm stop web", err, errdefs.Remedies(err))
	}
	if _, err := h.Open("web"); err != nil {
		t.Errorf("the refused VM is no longer registered: %v", err)
	}
}

// TestCreateOneDiskChoice: an existing disk excludes a new one's size and
// no disk at all.
func TestCreateOneDiskChoice(t *testing.T) {
	h := testHost(t)
	for _, o := range []CreateOptions{
		{Name: "a", OS: Linux, Disk: "/dev/null", DiskSize: "1G"},
		{Name: "b", OS: Linux, Disk: "/dev/null", NoDisk: true},
	} {
		if _, err := h.Create(o); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "give one of --disk") {
			t.Errorf("Create(%+v): %v; want invalid argument, one disk choice", o, err)
		}
	}
}
