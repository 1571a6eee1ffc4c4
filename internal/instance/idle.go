package instance

import (
	"log/slog"
	"sync/atomic"
	"time"

	"vtpm/internal/memtrim"
)

// idleAfter is how long an instance waits without a command before it
// gives back the pages of its code (memtrim). A VM uses its TPM in bursts
// (boot, attestation) and leaves it idle in between; the first command
// after an idle spell faults back what it runs from the page cache (no
// slower, measured, than waking the idle threads already costs).
const idleAfter = time.Second

// idleTrim unmaps an instance's code once it has been idle for idleAfter.
// Commands only count themselves (an atomic add). One goroutine waits on
// the timer, re-arms it while commands come, and after a trim waits until
// a command re-arms it. It is one goroutine for the instance's life, not
// one per timer (time.AfterFunc): starting a goroutine reads the function
// table, which would map back a large part of what the trim gave back.
type idleTrim struct {
	log      *slog.Logger
	commands atomic.Uint64
	parked   atomic.Bool
	timer    *time.Timer
	stopped  chan struct{}
}

func newIdleTrim(log *slog.Logger) *idleTrim {
	t := &idleTrim{log: log, timer: time.NewTimer(idleAfter), stopped: make(chan struct{})}
	go t.run()
	return t
}

// command records a command; after a trim it re-arms the timer.
func (t *idleTrim) command() {
	if t == nil {
		return
	}
	t.commands.Add(1)
	if t.parked.Load() && t.parked.CompareAndSwap(true, false) {
		t.timer.Reset(idleAfter)
	}
}

func (t *idleTrim) run() {
	var seen uint64 // commands at the last check
	for {
		select {
		case <-t.timer.C:
		case <-t.stopped:
			return
		}
		if n := t.commands.Load(); n != seen {
			seen = n
			t.timer.Reset(idleAfter)
			continue
		}
		t.log.Debug("idle: giving back the pages of code", "after", idleAfter)
		if _, err := memtrim.DropCode(); err != nil {
			t.log.Warn("giving back the pages of idle code", "err", err)
		}
		t.parked.Store(true)
		// A command that came during the trim saw the timer armed and did
		// not re-arm it; count it now.
		if n := t.commands.Load(); n != seen && t.parked.CompareAndSwap(true, false) {
			seen = n
			t.timer.Reset(idleAfter)
		}
	}
}

func (t *idleTrim) stop() {
	if t != nil {
		t.timer.Stop()
		close(t.stopped)
	}
}
