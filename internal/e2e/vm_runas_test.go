package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"vtpm/internal/qemutest"
	"vtpm/internal/testutil"
)

// TestVMStartRunsTPMUnprivileged: `vtpm vm start` run as root starts the
// VM's vTPM as tss (or nobody where there is no tss), hands it the
// bundle's tpm/ directory, and the guest still has its TPM.
func TestVMStartRunsTPMUnprivileged(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "needs root: only root's vTPMs drop privileges")
	}
	qemutest.SkipIfUnavailable(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	want, err := user.Lookup("tss")
	if err != nil {
		if want, err = user.Lookup("nobody"); err != nil {
			testutil.Missing(t, "neither tss nor nobody exists")
		}
	}
	dir := qemutest.ShortTempDir(t)
	// The vTPM user must be able to reach the bundle below dir.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	h := newVMHost(t, dir)
	img := guestImage(ctx, t)
	h.must(ctx, createArgs(img, "runas", "linux", "--tpm")...)

	setUser := func(name string) {
		t.Helper()
		p := filepath.Join(h.list(ctx)["runas"].Path, "vm.json")
		var c map[string]any
		if err := json.Unmarshal(mustRead(t, p), &c); err != nil {
			t.Fatal(err)
		}
		c["tpm_user"] = name
		b, _ := json.Marshal(c)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Refusals, before QEMU starts. XDG_RUNTIME_DIR is private to the
	// caller (0700): the vTPM user could not write its pid file below it.
	run := filepath.Join(dir, "run")
	for _, tc := range []struct {
		user string
		want []string
	}{
		{want.Username, []string{"runs as " + want.Username, run, "chmod o+x " + run, "tpm_user"}},
		{"no-such-vtpm-user", []string{`tpm_user "no-such-vtpm-user"`, "no such user"}},
	} {
		setUser(tc.user)
		_, errOut, err := h.run(ctx, "vm", "start", "runas")
		if err == nil {
			h.run(ctx, "vm", "stop", "runas", "--timeout", "0")
			t.Fatalf("vm start with tpm_user %q succeeded, want a refusal", tc.user)
		}
		for _, w := range tc.want {
			if !strings.Contains(errOut, w) {
				t.Errorf("tpm_user %q: vm start error lacks %q:\n%s", tc.user, w, errOut)
			}
		}
	}
	setUser("")
	if err := os.Chmod(run, 0o755); err != nil {
		t.Fatal(err)
	}

	g := h.startVM(ctx, t, "runas")
	var vms []struct {
		Name   string
		Path   string
		TPMPid int `json:"tpm_pid"`
	}
	if err := json.Unmarshal([]byte(h.must(ctx, "vm", "list", "-a", "--json")), &vms); err != nil {
		t.Fatal(err)
	}
	if len(vms) != 1 || vms[0].TPMPid == 0 {
		t.Fatalf("vm list: %+v, want one VM with a vTPM pid", vms)
	}
	status, err := os.ReadFile("/proc/" + strconv.Itoa(vms[0].TPMPid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if ids, ok := strings.CutPrefix(line, "Uid:"); ok {
			for _, id := range strings.Fields(ids) {
				if id != want.Uid {
					t.Errorf("vTPM process %s, want uid %s (%s) throughout", line, want.Uid, want.Username)
				}
			}
		}
	}
	st, err := os.Stat(filepath.Join(vms[0].Path, "tpm"))
	if err != nil {
		t.Fatal(err)
	}
	if uid := st.Sys().(*syscall.Stat_t).Uid; strconv.Itoa(int(uid)) != want.Uid {
		t.Errorf("bundle tpm/ is owned by uid %d, want %s (%s)", uid, want.Uid, want.Username)
	}

	if v := g.must(ctx, t, "cat /sys/class/tpm/tpm0/tpm_version_major"); v != "2" {
		t.Errorf("guest TPM version %q, want 2", v)
	}
	g.ek(ctx, t) // the guest's TPM works: it derives its EK
	h.must(ctx, "vm", "stop", "runas", "--timeout", "1s")
	if b, err := os.ReadFile(filepath.Join(vms[0].Path, "logs", "tpm.log")); err == nil && strings.Contains(string(b), "ERROR") {
		t.Errorf("the vTPM logged errors:\n%s", b)
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
