package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"

	"vtpm/internal/errdefs"
)

// ErrClosed reports a session whose connection is gone (QEMU exited or the
// session was closed). It matches errdefs.ErrUnavailable.
var ErrClosed error = closedError{}

type closedError struct{}

func (closedError) Error() string        { return "QMP connection closed" }
func (closedError) Is(target error) bool { return target == errdefs.ErrUnavailable }

// Error is an error reply from QEMU.
type Error struct {
	Command string
	Class   string `json:"class"` // GenericError, CommandNotFound, DeviceNotFound, …
	Desc    string `json:"desc"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("QMP %s: %s: %s", e.Command, e.Class, e.Desc)
}

// Is maps QEMU's error classes to error kinds: a command this QEMU lacks is
// unavailable, a device it does not have is not found, and the rest is a
// refusal in QEMU's current state.
func (e *Error) Is(target error) bool {
	switch e.Class {
	case "CommandNotFound":
		return target == errdefs.ErrUnavailable
	case "DeviceNotFound":
		return target == errdefs.ErrNotFound
	}
	return target == errdefs.ErrFailedPrecondition
}

// Event is an asynchronous QMP event.
type Event struct {
	Name      string          `json:"event"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

type reply struct {
	ID     *uint64         `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
	Event  string          `json:"event"`
}

// Conn is one QMP session. Its methods may be called from several
// goroutines.
type Conn struct {
	conn net.Conn
	log  *slog.Logger

	writeMu sync.Mutex
	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan reply
	events  []Event
	evCh    chan struct{} // closed and replaced on every event
	err     error         // why the connection is gone
	closed  chan struct{}
}

// Dial connects to QEMU's monitor socket at path (a unix socket) and
// negotiates capabilities.
func Dial(ctx context.Context, path string, log *slog.Logger) (*Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to QEMU's monitor %s: %w", path, err)
	}
	q, err := New(ctx, c, log)
	if err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

// New starts a session on conn, a fresh connection to a QEMU monitor (for
// instance one QEMU made to a listener of the caller): it reads the greeting
// and negotiates capabilities. log (nil: discard) receives events and
// undecodable messages at debug level.
func New(ctx context.Context, conn net.Conn, log *slog.Logger) (*Conn, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	q := &Conn{
		conn:    conn,
		log:     log,
		pending: make(map[uint64]chan reply),
		evCh:    make(chan struct{}),
		closed:  make(chan struct{}),
	}
	r := bufio.NewReader(conn)
	greeting, err := readGreeting(ctx, conn, r)
	if err != nil {
		return nil, err
	}
	var g struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if err := json.Unmarshal(greeting, &g); err != nil || g.QMP == nil {
		return nil, fmt.Errorf("unexpected QMP greeting %q", greeting)
	}
	go q.readLoop(r)
	if _, err := q.Execute(ctx, "qmp_capabilities", nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

// readGreeting reads QEMU's first line, giving up when ctx ends. An ended
// ctx interrupts the read with a past deadline, never by closing conn: the
// caller's ctx may end right after a greeting that arrived in time (a dial
// timeout cancelled on return), and the connection must outlive it.
func readGreeting(ctx context.Context, conn net.Conn, r *bufio.Reader) ([]byte, error) {
	var (
		mu       sync.Mutex
		finished bool
	)
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if !finished {
			_ = conn.SetReadDeadline(time.Unix(1, 0))
		}
	})
	line, err := r.ReadBytes('\n')
	mu.Lock()
	finished = true
	mu.Unlock()
	stop()
	if derr := conn.SetReadDeadline(time.Time{}); err == nil && derr != nil {
		err = derr
	}
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("read QMP greeting: %w", err)
	}
	return line, nil
}

func (q *Conn) readLoop(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = r.ReadBytes('\n')
		if err != nil {
			break
		}
		var rep reply
		if jerr := json.Unmarshal(line, &rep); jerr != nil {
			q.log.Warn("undecodable QMP message", "msg", string(line), "err", jerr)
			continue
		}
		if rep.Event != "" {
			var ev Event
			if jerr := json.Unmarshal(line, &ev); jerr == nil {
				q.log.Debug("qmp event", "event", ev.Name, "data", string(ev.Data))
				q.mu.Lock()
				q.events = append(q.events, ev)
				close(q.evCh)
				q.evCh = make(chan struct{})
				q.mu.Unlock()
			}
			continue
		}
		if rep.ID == nil {
			continue
		}
		q.mu.Lock()
		ch := q.pending[*rep.ID]
		delete(q.pending, *rep.ID)
		q.mu.Unlock()
		if ch != nil {
			ch <- rep
		}
	}
	q.mu.Lock()
	q.err = fmt.Errorf("%w: %v", ErrClosed, err)
	q.mu.Unlock()
	close(q.closed)
}

// Execute runs one command with args (marshalled as its "arguments"; nil
// for none) and returns its "return" value. An error reply is an *Error.
func (q *Conn) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	return q.execute(ctx, cmd, args, nil)
}

// execute sends cmd, with descriptors rights (SCM_RIGHTS) on the same
// write when there are any, and waits for its reply.
func (q *Conn) execute(ctx context.Context, cmd string, args any, rights []byte) (json.RawMessage, error) {
	q.mu.Lock()
	if q.err != nil {
		err := q.err
		q.mu.Unlock()
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	q.nextID++
	id := q.nextID
	ch := make(chan reply, 1)
	q.pending[id] = ch
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		delete(q.pending, id)
		q.mu.Unlock()
	}()

	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	msg, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("QMP %s: encode arguments: %w", cmd, err)
	}
	msg = append(msg, '\n')
	q.writeMu.Lock()
	if rights != nil {
		_, _, err = q.conn.(*net.UnixConn).WriteMsgUnix(msg, rights, nil)
	} else {
		_, err = q.conn.Write(msg)
	}
	q.writeMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("QMP %s: send: %w", cmd, err)
	}
	select {
	case rep := <-ch:
		if rep.Error != nil {
			rep.Error.Command = cmd
			return nil, rep.Error
		}
		return rep.Return, nil
	case <-q.closed:
		// A reply may race the close (quit's does).
		select {
		case rep := <-ch:
			return rep.Return, nil
		default:
		}
		q.mu.Lock()
		err := q.err
		q.mu.Unlock()
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	case <-ctx.Done():
		return nil, fmt.Errorf("QMP %s: %w", cmd, ctx.Err())
	}
}

// AddFD hands f to QEMU over the monitor socket (SCM_RIGHTS) into a new fd
// set and returns that set and the descriptor's number inside QEMU, which
// /proc/self/fd/N names there: how a QEMU confined as another user reads a
// directory (TLS credentials) it could not reach by path. The session must
// be on a unix socket; the descriptor lives while a monitor is connected.
func (q *Conn) AddFD(ctx context.Context, f *os.File) (set, fd int, err error) {
	if _, ok := q.conn.(*net.UnixConn); !ok {
		return 0, 0, fmt.Errorf("QMP add-fd: the monitor is not a unix socket")
	}
	ret, err := q.execute(ctx, "add-fd", nil, syscall.UnixRights(int(f.Fd())))
	runtime.KeepAlive(f) // open until sent
	if err != nil {
		return 0, 0, err
	}
	var r struct {
		Set int `json:"fdset-id"`
		FD  int `json:"fd"`
	}
	if err := json.Unmarshal(ret, &r); err != nil {
		return 0, 0, fmt.Errorf("decode add-fd: %w", err)
	}
	return r.Set, r.FD, nil
}

// WaitEvent waits for an event named name among those received from index
// from on (0: since the session began); it returns the event and the index
// after it, to wait for the next one.
func (q *Conn) WaitEvent(ctx context.Context, name string, from int) (Event, int, error) {
	for {
		q.mu.Lock()
		for i := from; i < len(q.events); i++ {
			if q.events[i].Name == name {
				ev := q.events[i]
				q.mu.Unlock()
				return ev, i + 1, nil
			}
		}
		from = len(q.events)
		ch := q.evCh
		q.mu.Unlock()
		select {
		case <-ch:
		case <-q.closed:
			return Event{}, from, fmt.Errorf("wait for QMP event %s: %w", name, ErrClosed)
		case <-ctx.Done():
			return Event{}, from, fmt.Errorf("wait for QMP event %s: %w", name, ctx.Err())
		}
	}
}

// Events returns the events received so far.
func (q *Conn) Events() []Event {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]Event(nil), q.events...)
}

// Done is closed when the connection is gone.
func (q *Conn) Done() <-chan struct{} { return q.closed }

// Close ends the session.
func (q *Conn) Close() error { return q.conn.Close() }
