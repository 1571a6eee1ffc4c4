package hostcheck

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"vtpm/internal/testutil"
)

// fakeKVMHost stands in for what the KVM verdict depends on; its probe
// counts its runs and answers next.
type fakeKVMHost struct {
	dir, exe string
	probes   int
	next     error
}

func newFakeKVMHost(t *testing.T) *fakeKVMHost {
	t.Helper()
	h := &fakeKVMHost{dir: t.TempDir()}
	h.exe = h.file(t, "qemu-system-x86_64", "qemu")
	oldBoot, oldDir, oldProbe, oldDev, oldFW := bootIDFile, kvmCacheDir, kvmProbe, KVMDevice, FirmwareDir
	t.Cleanup(func() {
		bootIDFile, kvmCacheDir, kvmProbe, KVMDevice, FirmwareDir = oldBoot, oldDir, oldProbe, oldDev, oldFW
	})
	bootIDFile = h.file(t, "boot_id", "1111\n")
	KVMDevice = h.file(t, "kvm", "")
	FirmwareDir = filepath.Join(h.dir, "ovmf")
	kvmCacheDir = func() string { return filepath.Join(h.dir, "run", "vtpm") }
	kvmProbe = func(string) error { h.probes++; return h.next }
	return h
}

// file writes name in the host's directory, as a new file (a new inode).
func (h *fakeKVMHost) file(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(h.dir, name)
	tmp := p + ".new"
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tmp, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		t.Fatal(err)
	}
	return p
}

func (h *fakeKVMHost) cacheFile() string { return filepath.Join(kvmCacheDir(), kvmCacheName) }

// sameVerdict: both usable, or both refusals for the same reason.
func sameVerdict(a, b error) bool {
	return (a == nil && b == nil) || (a != nil && b != nil && a.Error() == b.Error())
}

func TestKVMVerdictIsKeptForTheBoot(t *testing.T) {
	refused := &kvmRefusal{"kvm_put_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed."}
	other := &kvmRefusal{"the guest did not keep running"}
	tests := []struct {
		name   string
		first  error // the first probe's verdict
		change func(t *testing.T, h *fakeKVMHost)
		fresh  bool // the second look is doctor's
		probes int  // in the second look
	}{
		{"hit, usable", nil, nil, false, 0},
		{"hit, refused", refused, nil, false, 0},
		{"miss on boot id", nil, func(t *testing.T, h *fakeKVMHost) { h.file(t, "boot_id", "2222\n") }, false, 1},
		{"miss on QEMU upgraded", refused, func(t *testing.T, h *fakeKVMHost) { h.file(t, "qemu-system-x86_64", "qemu 10") }, false, 1},
		{"miss on another QEMU", nil, func(t *testing.T, h *fakeKVMHost) { h.exe = h.file(t, "bin/qemu-system-x86_64", "qemu") }, false, 1},
		{"miss on /dev/kvm recreated", refused, func(t *testing.T, h *fakeKVMHost) { h.file(t, "kvm", "") }, false, 1},
		{"miss on firmware installed", nil, func(t *testing.T, h *fakeKVMHost) { h.file(t, "ovmf/"+OVMFCode, "ovmf") }, false, 1},
		{"corrupt file", refused, func(t *testing.T, h *fakeKVMHost) { h.file(t, "run/vtpm/"+kvmCacheName, `{"key":`) }, false, 1},
		{"usable with a reason", refused, func(t *testing.T, h *fakeKVMHost) {
			r, _ := readKVMRecord(h.cacheFile())
			r.Usable = true
			writeKVMRecord(kvmCacheDir(), h.cacheFile(), r)
		}, false, 1},
		{"foreign owner", nil, func(t *testing.T, h *fakeKVMHost) {
			if os.Geteuid() != 0 {
				testutil.Missing(t, "a file of another user needs root to make")
			}
			if err := os.Chown(h.cacheFile(), 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}, false, 1},
		{"doctor probes again", refused, nil, true, 1},
		{"a failed probe is no verdict", errors.New("run qemu: resource temporarily unavailable"), nil, false, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newFakeKVMHost(t)
			h.next = tt.first
			if err := cachedKVMProbe(h.exe, false); !sameVerdict(err, tt.first) || h.probes != 1 {
				t.Fatalf("first look: %v after %d probes, want %v after 1", err, h.probes, tt.first)
			}
			if tt.change != nil {
				tt.change(t, h)
			}
			// A second probe changes a refusal's reason, to tell the verdicts apart.
			_, isRefusal := tt.first.(*kvmRefusal)
			want := tt.first
			if isRefusal && tt.probes > 0 {
				h.next, want = other, other
			}
			h.probes = 0
			if err := cachedKVMProbe(h.exe, tt.fresh); !sameVerdict(err, want) || h.probes != tt.probes {
				t.Errorf("second look: %v after %d probes, want %v after %d", err, h.probes, want, tt.probes)
			}
			// Whatever the second look probed is what the boot keeps.
			h.probes = 0
			err := cachedKVMProbe(h.exe, false)
			var r *kvmRefusal
			if tt.first != nil && !isRefusal {
				if h.probes != 1 {
					t.Errorf("a failed probe was kept: %d probes on the third look", h.probes)
				}
			} else if !sameVerdict(err, want) || h.probes != 0 || (err != nil && !errors.As(err, &r)) {
				t.Errorf("third look: %v (%T) after %d probes, want %v from the file", err, err, h.probes, want)
			}
		})
	}
}

func TestKVMVerdictFile(t *testing.T) {
	h := newFakeKVMHost(t)
	if err := cachedKVMProbe(h.exe, false); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		mode os.FileMode
	}{{kvmCacheDir(), os.ModeDir | 0o755}, {h.cacheFile(), 0o644}} {
		st, err := os.Stat(tc.path)
		if err != nil || st.Mode() != tc.mode {
			t.Errorf("%s: %v, %v; want mode %v", tc.path, st.Mode(), err, tc.mode)
		}
	}

	// Without a runtime directory every process probes.
	kvmCacheDir = func() string { return "" }
	h.probes = 0
	for range 2 {
		cachedKVMProbe(h.exe, false)
	}
	if h.probes != 2 {
		t.Errorf("%d probes in two looks without a runtime directory, want 2", h.probes)
	}
}

// TestProbeKVMVerdicts: only what QEMU showed about KVM is a verdict (and
// kept); a QEMU that aborts is not waited for.
func TestProbeKVMVerdicts(t *testing.T) {
	old := FirmwareDir
	t.Cleanup(func() { FirmwareDir = old })
	FirmwareDir = t.TempDir()
	tests := []struct {
		name, script string
		refusal      string // "": usable
	}{
		{"aborts on the first vCPU run", "echo 'qemu: kvm_put_msrs: Assertion failed.' >&2; exit 134", "qemu: kvm_put_msrs: Assertion failed."},
		{"exits silently", "exit 1", "the guest did not keep running"},
		{"keeps running", `read c; read s; read q; echo '{"return": {"status": "running", "running": true}}'`, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			exe := filepath.Join(t.TempDir(), "qemu")
			if err := os.WriteFile(exe, []byte("#!/bin/sh\n"+tt.script+"\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			err := probeKVM(exe)
			var r *kvmRefusal
			switch {
			case tt.refusal == "" && err != nil:
				t.Errorf("probe: %v, want usable", err)
			case tt.refusal != "" && (!errors.As(err, &r) || r.why != tt.refusal):
				t.Errorf("probe: %v (%T), want the refusal %q", err, err, tt.refusal)
			}
		})
	}
}
