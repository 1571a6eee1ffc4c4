package hostcheck

import (
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"vtpm/internal/atomicfile"
)

// The KVM probe's verdict holds until the host changes under it: a reboot
// (kernel, modules, nested settings of the outer hypervisor), another QEMU,
// another firmware, a reloaded KVM module. So it is kept for the boot in a
// small file keyed by exactly those, and every VM start after the first is
// spared the probe's run. The file is only a hint: one that does not parse,
// has another key or was written by another user (not root, not us) is
// ignored and replaced; without a runtime directory nothing is kept.
var (
	bootIDFile  = "/proc/sys/kernel/random/boot_id"
	kvmCacheDir = runtimeDir
	kvmProbe    = probeKVM
)

// kvmCacheName is the verdict's file in the runtime directory.
const kvmCacheName = "kvm-probe.json"

// runtimeDir is where the verdict is kept: /run/vtpm for root, else the
// user's own $XDG_RUNTIME_DIR/vtpm, else nowhere (a shared temporary
// directory would let others plant verdicts).
func runtimeDir() string {
	if os.Geteuid() == 0 {
		return "/run/vtpm"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "vtpm")
	}
	return ""
}

// fileID tells a file's versions apart without reading it.
type fileID struct {
	Path  string `json:"path"`
	Dev   uint64 `json:"dev"`
	Ino   uint64 `json:"ino"`
	Rdev  uint64 `json:"rdev,omitempty"`
	Size  int64  `json:"size"`
	MTime int64  `json:"mtime_ns"`
}

func identify(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileID{Path: path}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return fileID{Path: path, Dev: st.Dev, Ino: st.Ino, Rdev: st.Rdev, Size: st.Size, MTime: st.Mtim.Nano()}, nil
}

// kvmKey is what the verdict depends on.
type kvmKey struct {
	BootID   string `json:"boot_id"`
	QEMU     fileID `json:"qemu"`
	KVM      fileID `json:"kvm"`
	Firmware fileID `json:"firmware"` // only the path when absent: QEMU's own BIOS ran
}

func kvmKeyFor(exe string) (kvmKey, error) {
	boot, err := os.ReadFile(bootIDFile)
	if err != nil {
		return kvmKey{}, err
	}
	k := kvmKey{BootID: strings.TrimSpace(string(boot))}
	if k.QEMU, err = identify(exe); err != nil {
		return kvmKey{}, err
	}
	if k.KVM, err = identify(KVMDevice); err != nil {
		return kvmKey{}, err
	}
	code, _ := Firmware(false)
	k.Firmware, _ = identify(code)
	return k, nil
}

// kvmRecord is the cache file.
type kvmRecord struct {
	Key    kvmKey `json:"key"`
	Usable bool   `json:"usable"`
	Reason string `json:"reason,omitempty"` // the refusal, when not usable
}

// cachedKVMProbe returns the boot's verdict for exe, probing (and keeping
// the verdict) when there is none or fresh asks for a new one.
func cachedKVMProbe(exe string, fresh bool) error {
	key, err := kvmKeyFor(exe)
	dir := kvmCacheDir()
	if err != nil || dir == "" {
		return kvmProbe(exe)
	}
	path := filepath.Join(dir, kvmCacheName)
	if r, ok := readKVMRecord(path); ok && r.Key == key && !fresh {
		if r.Usable {
			return nil
		}
		return &kvmRefusal{r.Reason}
	}
	err = kvmProbe(exe)
	var refusal *kvmRefusal
	switch {
	case err == nil:
		writeKVMRecord(dir, path, kvmRecord{Key: key, Usable: true})
	case errors.As(err, &refusal):
		writeKVMRecord(dir, path, kvmRecord{Key: key, Reason: refusal.why})
	}
	return err
}

// readKVMRecord reads a well-formed record written by root or by us.
func readKVMRecord(path string) (kvmRecord, bool) {
	var r kvmRecord
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return r, false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return r, false
	}
	if uid := int(st.Sys().(*syscall.Stat_t).Uid); uid != 0 && uid != os.Geteuid() {
		return r, false
	}
	b, err := io.ReadAll(io.LimitReader(f, 1<<12))
	if err != nil || json.Unmarshal(b, &r) != nil || r.Usable == (r.Reason != "") {
		return kvmRecord{}, false
	}
	return r, true
}

// writeKVMRecord keeps r for the boot. A failure only costs the next
// process a probe, so it is not reported.
func writeKVMRecord(dir, path string, r kvmRecord) {
	b, err := json.Marshal(r)
	if err != nil || os.MkdirAll(dir, 0o755) != nil {
		return
	}
	_ = atomicfile.Write(path, b, 0o644)
}
