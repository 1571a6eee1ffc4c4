package qemutest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"
)

// Serial is the command channel of a guest whose serial console QEMU serves
// on a unix socket (e.g. `vtpm vm start --serial-socket PATH`, a chardev
// with server=on,wait=off). It speaks the same framing as VM.Run.
type Serial struct {
	s *serialConn
}

// DialSerial connects to a guest's serial console socket and waits until
// the guest's command loop answers. Output printed before the connection
// is not seen, so readiness is probed with a command rather than waiting for
// the ready marker.
func DialSerial(ctx context.Context, path string) (*Serial, error) {
	var conn net.Conn
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			conn = c
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to serial console %s: %w", path, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	s := &Serial{s: newSerial(conn, nil)}
	for {
		// A newline ends any partial line the guest's tty holds.
		if _, err := conn.Write([]byte("\n")); err != nil {
			conn.Close()
			return nil, fmt.Errorf("serial console %s: %w", path, err)
		}
		actx, cancel := context.WithTimeout(ctx, 3*time.Second)
		_, err := s.s.run(actx, nil, "true")
		cancel()
		if err == nil {
			return s, nil
		}
		if ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
			conn.Close()
			return nil, fmt.Errorf("wait for the guest's command loop on %s: %w", path, err)
		}
	}
}

// Run runs a shell command in the guest and returns its combined output;
// a non-zero exit status gives a *CommandError.
func (s *Serial) Run(ctx context.Context, command string) (string, error) {
	return s.s.run(ctx, nil, command)
}

// Close closes the connection; the guest keeps running.
func (s *Serial) Close() error { return s.s.conn.Close() }
