package vm

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"time"
)

// qmp is a minimal QMP client: capabilities negotiation and commands
// without arguments, events skipped.
type qmp struct {
	conn net.Conn
	dec  *json.Decoder
}

func dialQMP(ctx context.Context, path string) (*qmp, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to QEMU's monitor %s: %w", path, err)
	}
	q := &qmp{conn: conn, dec: json.NewDecoder(bufio.NewReader(conn))}
	var greeting map[string]json.RawMessage
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := q.dec.Decode(&greeting); err != nil {
		conn.Close()
		return nil, fmt.Errorf("QEMU's monitor: read greeting: %w", err)
	}
	if err := q.execute("qmp_capabilities"); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) execute(cmd string) error {
	q.conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(q.conn, `{"execute":%q}`+"\n", cmd); err != nil {
		return fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		var msg struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class, Desc string
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := q.dec.Decode(&msg); err != nil {
			return fmt.Errorf("QMP %s: %w", cmd, err)
		}
		switch {
		case msg.Error != nil:
			return fmt.Errorf("QMP %s: %s: %s", cmd, msg.Error.Class, msg.Error.Desc)
		case msg.Return != nil:
			return nil
		}
	}
}

func (q *qmp) Close() error { return q.conn.Close() }
