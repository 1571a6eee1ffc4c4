package qemutest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"sync"
)

// readyMarker is printed by the guest's /init once it reads commands.
const readyMarker = "@@VTPM-GUEST-READY@@"

// maxCommandLen keeps a request line below the tty's canonical-mode limit
// of 4095 bytes.
const maxCommandLen = 3000

// serialConn is the host end of the guest's ttyS0. Everything the guest
// prints is kept in memory (for matching replies) and in a log file (for
// people).
type serialConn struct {
	conn net.Conn
	log  *os.File

	mu      sync.Mutex
	buf     []byte        // all output, with \r removed
	changed chan struct{} // closed and replaced whenever buf grows
	err     error         // read error once the connection is gone
	done    chan struct{}

	runMu sync.Mutex // one command at a time
}

func newSerial(conn net.Conn, log *os.File) *serialConn {
	s := &serialConn{conn: conn, log: log, changed: make(chan struct{}), done: make(chan struct{})}
	go s.readLoop()
	return s
}

func (s *serialConn) readLoop() {
	b := make([]byte, 4096)
	for {
		n, err := s.conn.Read(b)
		if n > 0 {
			if s.log != nil {
				_, _ = s.log.Write(b[:n])
			}
			s.mu.Lock()
			s.buf = append(s.buf, bytes.ReplaceAll(b[:n], []byte("\r"), nil)...)
			close(s.changed)
			s.changed = make(chan struct{})
			s.mu.Unlock()
		}
		if err != nil {
			s.mu.Lock()
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			s.err = err
			s.mu.Unlock()
			close(s.done)
			return
		}
	}
}

// waitFor waits until match finds something in the output after offset
// from; match returns the end of what it consumed, or -1.
func (s *serialConn) waitFor(ctx context.Context, from int, abort <-chan struct{}, match func([]byte) int) (int, error) {
	for {
		s.mu.Lock()
		if from > len(s.buf) {
			from = len(s.buf)
		}
		if end := match(s.buf[from:]); end >= 0 {
			s.mu.Unlock()
			return from + end, nil
		}
		ch, err := s.changed, s.err
		s.mu.Unlock()
		if err != nil {
			return 0, fmt.Errorf("serial console closed: %w", err)
		}
		select {
		case <-ch:
		case <-s.done:
		case <-abort:
			return 0, errors.New("qemu exited or stopped")
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// kernelPanic is how a guest that cannot run /init shows up on the console.
const kernelPanic = "Kernel panic - not syncing"

func (s *serialConn) waitReady(ctx context.Context, abort <-chan struct{}) error {
	panicked := false
	_, err := s.waitFor(ctx, 0, abort, func(b []byte) int {
		if i := bytes.Index(b, []byte(readyMarker)); i >= 0 {
			return i + len(readyMarker)
		}
		if bytes.Contains(b, []byte(kernelPanic)) {
			panicked = true
			return len(b)
		}
		return -1
	})
	if err != nil {
		return fmt.Errorf("wait for guest command loop: %w", err)
	}
	if panicked {
		return errors.New("guest kernel panicked during boot (see the serial log)")
	}
	return nil
}

// CommandError is returned by Run when the command exits non-zero.
type CommandError struct {
	Command string
	Status  int
	Output  string
}

func (e *CommandError) Error() string {
	return fmt.Sprintf("guest command %q exited with status %d: %s", e.Command, e.Status, e.Output)
}

// run sends one command and waits for its framed reply.
func (s *serialConn) run(ctx context.Context, abort <-chan struct{}, command string) (string, error) {
	s.runMu.Lock()
	defer s.runMu.Unlock()
	payload := base64.StdEncoding.EncodeToString([]byte(command))
	if len(payload) > maxCommandLen {
		return "", fmt.Errorf("guest command too long (%d bytes encoded, max %d); put it in a file", len(payload), maxCommandLen)
	}
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	id := "@@C-" + hex.EncodeToString(nonce[:])

	s.mu.Lock()
	start := len(s.buf)
	s.mu.Unlock()
	if _, err := s.conn.Write([]byte(id + " " + payload + "\n")); err != nil {
		return "", fmt.Errorf("send guest command %q: %w", command, err)
	}

	begin := []byte("\n@@BEGIN " + id + "@@\n")
	endRE := regexp.MustCompile(`\n@@END ` + regexp.QuoteMeta(id) + ` (\d+)@@\n`)
	var out string
	status := -1
	_, err := s.waitFor(ctx, start, abort, func(b []byte) int {
		i := bytes.Index(b, begin)
		if i < 0 {
			return -1
		}
		body := b[i+len(begin):]
		loc := endRE.FindSubmatchIndex(body)
		if loc == nil {
			return -1
		}
		out = string(body[:loc[0]])
		status, _ = strconv.Atoi(string(body[loc[2]:loc[3]]))
		return i + len(begin) + loc[1]
	})
	if err != nil {
		return "", fmt.Errorf("guest command %q: %w", command, err)
	}
	if status != 0 {
		return out, &CommandError{Command: command, Status: status, Output: out}
	}
	return out, nil
}
