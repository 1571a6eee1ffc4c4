package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"vtpm/internal/errdefs"
)

// fakeQEMU answers QMP on conn: it greets, sends an event before any
// command, and replies to commands from replies (by command name; "quit"
// replies and hangs up).
func fakeQEMU(t *testing.T, conn net.Conn, replies map[string]string) {
	t.Helper()
	go func() {
		defer conn.Close()
		fmt.Fprintln(conn, `{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": ["oob"]}}`)
		sc := bufio.NewScanner(conn)
		first := true
		for sc.Scan() {
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
				return
			}
			if first {
				first = false
			} else {
				fmt.Fprintln(conn, `{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}`)
			}
			r, ok := replies[req.Execute]
			if !ok {
				r = `"return": {}`
			}
			fmt.Fprintf(conn, "{%s, \"id\": %s}\n", r, req.ID)
			if req.Execute == "quit" {
				return
			}
		}
	}()
}

func TestSession(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client, server := net.Pipe()
	fakeQEMU(t, server, map[string]string{
		"query-status":  `"return": {"status": "running", "running": true}`,
		"query-migrate": `"return": {"status": "failed", "error-desc": "load of the TPM state failed"}`,
		"nope":          `"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}`,
		"device_del":    `"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}`,
		"migrate":       `"error": {"class": "GenericError", "desc": "already migrating"}`,
	})
	q, err := New(ctx, client, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if st, err := q.Status(ctx); err != nil || st != "running" {
		t.Fatalf("Status = %q, %v", st, err)
	}
	// The STOP event came before the wait began.
	if ev, next, err := q.WaitEvent(ctx, "STOP", 0); err != nil || ev.Name != "STOP" || next < 1 {
		t.Fatalf("WaitEvent = %+v, %d, %v", ev, next, err)
	}
	m, err := q.QueryMigrate(ctx)
	if err != nil || !m.Finished() || m.ErrorDesc != "load of the TPM state failed" {
		t.Errorf("QueryMigrate = %+v, %v", m, err)
	}
	tests := []struct {
		cmd  string
		args any
		kind error
	}{
		{"nope", nil, errdefs.ErrUnavailable},
		{"device_del", map[string]string{"id": "x"}, errdefs.ErrNotFound},
		{"migrate", map[string]string{"uri": "unix:/x"}, errdefs.ErrFailedPrecondition},
	}
	for _, tt := range tests {
		_, err := q.Execute(ctx, tt.cmd, tt.args)
		var qe *Error
		if !errors.As(err, &qe) || qe.Command != tt.cmd || qe.Desc == "" || errdefs.KindOf(err) != tt.kind {
			t.Errorf("%s: %v (kind %v), want a QMP error of kind %v", tt.cmd, err, errdefs.KindOf(err), tt.kind)
		}
	}
	if err := q.Quit(ctx); err != nil {
		t.Errorf("Quit: %v", err)
	}
	select {
	case <-q.Done():
	case <-ctx.Done():
		t.Fatal("the session did not end after quit")
	}
	if _, err := q.Status(ctx); !errors.Is(err, ErrClosed) || !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("a command after quit: %v, want ErrClosed", err)
	}
	if _, _, err := q.WaitEvent(ctx, "RESUME", 0); !errors.Is(err, ErrClosed) {
		t.Errorf("waiting for an event after quit: %v, want ErrClosed", err)
	}
}

func TestGreetingTimesOut(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := New(ctx, client, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("New on a silent monitor: %v, want the deadline", err)
	}
}
