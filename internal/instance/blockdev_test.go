package instance_test

import (
	"bytes"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"vtpm/internal/swtpm/statefile"
	"vtpm/internal/testutil"
)

// loopDevice attaches a new zeroed image of size bytes to a loop device
// and returns the device's path; it is detached at cleanup.
func loopDevice(t *testing.T, size int64) string {
	t.Helper()
	if os.Getuid() != 0 {
		testutil.Missing(t, "loop devices need root")
	}
	testutil.Need(t, "losetup")
	img := filepath.Join(shortDir(t), "tpm2.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err := testutil.RunErr(nil, "losetup", "--show", "-f", img)
	if err != nil {
		testutil.Missing(t, "losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(out)
	t.Cleanup(func() { testutil.RunErr(nil, "losetup", "-d", dev) })
	return dev
}

// TestBlockDeviceState keeps a TPM's state in swtpm's file backend on a
// block device (--tpmstate backend-uri=file:///dev/loopN, as Proxmox's
// tpmstate volumes and swtpm's test_tpm2_save_load_state_2_block use it),
// as root and as the --runas user: the zeroed device is formatted, the
// TPM's NV index survives a restart, and the real swtpm reads what vtpm
// wrote.
func TestBlockDeviceState(t *testing.T) {
	t.Parallel()
	needTools(t)
	nv := []byte("kept on a block device")
	tests := []struct {
		name string
		im   impl
		args []string
	}{
		{"swtpm", realSwtpm, nil},
		{"vtpm", ourVtpm, nil},
		{"vtpm-runas", ourVtpm, []string{"--runas", "nobody"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dev := loopDevice(t, 4<<20)
			// The last --tpmstate wins, in swtpm as in vtpm.
			state := []string{"--tpmstate", "backend-uri=file://" + dev}
			args := append(state, tc.args...)
			p := startTPM(t, tc.im, tpmConfig{transport: tcpDataUnixCtrl, args: args})
			p.mustIoctl(t, "-i")
			if len(tc.args) > 0 {
				u, err := user.Lookup("nobody")
				if err != nil {
					t.Fatal(err)
				}
				if uids := strings.Fields(procStatus(t, p.Cmd.Process.Pid)["Uid"]); len(uids) == 0 || uids[0] != u.Uid {
					t.Fatalf("--runas nobody: the TPM runs with uids %v, want %s", uids, u.Uid)
				}
			}
			p.tpm2(t, "tpm2_startup", "-c")
			p.defineWriteNV(t, nv)
			p.tpm2(t, "tpm2_shutdown", "-c")
			p.shutdown(t)

			fi, err := os.Stat(dev)
			if err != nil {
				t.Fatal(err)
			}
			if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 {
				t.Errorf("%s is owned by uid %d after the TPM ran; a device keeps its owner", dev, st.Uid)
			}
			readers := []impl{tc.im}
			if tc.im == ourVtpm {
				readers = append(readers, realSwtpm)
			}
			for _, im := range readers {
				if im != tc.im {
					args = state
				}
				q := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, args: args})
				q.mustIoctl(t, "-i")
				q.tpm2(t, "tpm2_startup", "-c")
				if got := q.readNV(t, len(nv)); !bytes.Equal(got, nv) {
					t.Errorf("%s: NV after restart: %q, want %q", im, got, nv)
				}
				q.shutdown(t)
			}
		})
	}
}

// TestBlockDeviceNotOverwritten: a block device that holds something other
// than swtpm's state is refused, not formatted.
func TestBlockDeviceNotOverwritten(t *testing.T) {
	t.Parallel()
	needTools(t)
	dev := loopDevice(t, 1<<20)
	junk := []byte("a filesystem, not TPM state")
	if err := os.WriteFile(dev, junk, 0); err != nil {
		t.Fatal(err)
	}
	out, err := testutil.RunErr([]string{"VTPM_HOME=" + filepath.Join(shortDir(t), "home")}, testutil.Binary(t),
		"swtpm", "socket", "--tpm2", "--tpmstate", "backend-uri=file://"+dev, "--ctrl", "type=unixio,path="+filepath.Join(shortDir(t), "ctrl"))
	if exitCode(t, err) != 1 || !strings.Contains(out, "is not a swtpm linear state file") {
		t.Errorf("vtpm on a foreign block device: %v, want exit 1 naming the device's content:\n%s", err, out)
	}
	got := make([]byte, len(junk))
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, junk) {
		t.Errorf("device now starts with %q (%v), want %q", got, err, junk)
	}
}

// TestBlockDeviceTooSmall: a block device cannot grow, so a state that
// does not fit is refused and what the device held stays readable.
func TestBlockDeviceTooSmall(t *testing.T) {
	t.Parallel()
	dev := loopDevice(t, 4096)
	l, err := statefile.OpenLinear(dev, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Init(); err != nil {
		t.Fatalf("formatting a zeroed %s: %v", dev, err)
	}
	small := bytes.Repeat([]byte{1}, 1000)
	if err := l.Store("permall", small); err != nil {
		t.Fatalf("storing 1000 bytes: %v", err)
	}
	err = l.Store("volatilestate", make([]byte, 5000))
	if err == nil || !strings.Contains(err.Error(), "holds 4096 bytes") {
		t.Fatalf("storing 5000 bytes on a 4096-byte device: %v, want a refusal naming its size", err)
	}
	if got, err := l.Load("permall"); err != nil || !bytes.Equal(got, small) {
		t.Errorf("permall after the refusal: %d bytes, %v; want the 1000 stored", len(got), err)
	}
	if _, err := l.Load("volatilestate"); err == nil {
		t.Error("the refused volatile state reads back")
	}
}
