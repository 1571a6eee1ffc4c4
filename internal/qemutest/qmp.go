package qemutest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
)

// Event is an asynchronous QMP event.
type Event struct {
	Name      string          `json:"event"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// QMPError is an error reply from QEMU.
type QMPError struct {
	Command string
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

type qmpReply struct {
	ID     *uint64         `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *QMPError       `json:"error"`
	Event  string          `json:"event"`
}

// qmpConn is one QMP session. Replies are matched to requests by id, so
// events interleaved with replies are harmless.
type qmpConn struct {
	conn net.Conn
	log  *slog.Logger

	writeMu sync.Mutex
	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan qmpReply
	events  []Event
	evCh    chan struct{} // closed and replaced on every event
	err     error         // set when the connection is gone
	closed  chan struct{}
}

// newQMP does the greeting and capabilities handshake on conn.
func newQMP(ctx context.Context, conn net.Conn, log *slog.Logger) (*qmpConn, error) {
	q := &qmpConn{
		conn:    conn,
		log:     log,
		pending: make(map[uint64]chan qmpReply),
		evCh:    make(chan struct{}),
		closed:  make(chan struct{}),
	}
	r := bufio.NewReader(conn)
	greeting, err := r.ReadBytes('\n')
	if err != nil {
		return nil, fmt.Errorf("read qmp greeting: %w", err)
	}
	var g struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if err := json.Unmarshal(greeting, &g); err != nil || g.QMP == nil {
		return nil, fmt.Errorf("unexpected qmp greeting %q", greeting)
	}
	go q.readLoop(r)
	if _, err := q.Execute(ctx, "qmp_capabilities", nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmpConn) readLoop(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = r.ReadBytes('\n')
		if err != nil {
			break
		}
		var rep qmpReply
		if jerr := json.Unmarshal(line, &rep); jerr != nil {
			q.log.Warn("undecodable qmp message", "msg", string(line), "err", jerr)
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
	q.err = fmt.Errorf("qmp connection closed: %w", err)
	q.mu.Unlock()
	close(q.closed)
}

// Execute runs one QMP command and returns its "return" value.
func (q *qmpConn) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	q.mu.Lock()
	if q.err != nil {
		err := q.err
		q.mu.Unlock()
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	q.nextID++
	id := q.nextID
	ch := make(chan qmpReply, 1)
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
		return nil, fmt.Errorf("qmp %s: encode arguments: %w", cmd, err)
	}
	q.writeMu.Lock()
	_, err = q.conn.Write(append(msg, '\n'))
	q.writeMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("qmp %s: send: %w", cmd, err)
	}
	select {
	case rep := <-ch:
		if rep.Error != nil {
			rep.Error.Command = cmd
			return nil, rep.Error
		}
		return rep.Return, nil
	case <-q.closed:
		// quit's reply may race the close; treat a closed socket as done.
		select {
		case rep := <-ch:
			return rep.Return, nil
		default:
		}
		q.mu.Lock()
		err := q.err
		q.mu.Unlock()
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	case <-ctx.Done():
		return nil, fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

// waitEvent waits for an event named name, looking at events received from
// index from on; it returns the event and the index after it.
func (q *qmpConn) waitEvent(ctx context.Context, name string, from int) (Event, int, error) {
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
			return Event{}, from, fmt.Errorf("wait for qmp event %s: %w", name, errors.New("qmp connection closed"))
		case <-ctx.Done():
			return Event{}, from, fmt.Errorf("wait for qmp event %s: %w", name, ctx.Err())
		}
	}
}

func (q *qmpConn) Close() error {
	return q.conn.Close()
}
