package qmp

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"vtpm/internal/testutil"
)

// TestAddFDToQEMU hands a descriptor to a real QEMU, which puts it in an
// fd set that query-fdsets then lists.
func TestAddFDToQEMU(t *testing.T) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		testutil.Missing(t, "qemu-system-x86_64")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "qmp")
	cmd := exec.CommandContext(ctx, qemu, "-machine", "none", "-nodefaults", "-display", "none",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var conn net.Conn
	for conn == nil {
		if conn, err = net.Dial("unix", sock); err != nil {
			conn = nil
			select {
			case <-ctx.Done():
				t.Fatalf("QEMU's monitor: %v", err)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	q, err := New(ctx, conn, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	set, fd, err := q.AddFD(ctx, f)
	if err != nil || fd < 0 {
		t.Fatalf("AddFD = %d, %d, %v", set, fd, err)
	}
	raw, err := q.Execute(ctx, "query-fdsets", nil)
	if err != nil {
		t.Fatal(err)
	}
	var sets []struct {
		ID  int `json:"fdset-id"`
		FDs []struct {
			FD int `json:"fd"`
		} `json:"fds"`
	}
	if err := json.Unmarshal(raw, &sets); err != nil {
		t.Fatal(err)
	}
	if len(sets) != 1 || sets[0].ID != set || len(sets[0].FDs) != 1 || sets[0].FDs[0].FD != fd {
		t.Fatalf("query-fdsets = %s, want set %d holding fd %d", raw, set, fd)
	}
}
