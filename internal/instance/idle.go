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
// after an idle spell faults back what it runs from the page cache, which
// costs it well under a millisecond.
const idleAfter = time.Second

// idleTrim unmaps an instance's code once it has been idle for idleAfter.
// Commands only count themselves (an atomic add): the timer, armed after
// start, re-arms itself while commands come, and parks after a trim until
// the next command.
type idleTrim struct {
	log      *slog.Logger
	commands atomic.Uint64
	parked   atomic.Bool
	seen     atomic.Uint64 // commands at the last check
	timer    *time.Timer
}

func newIdleTrim(log *slog.Logger) *idleTrim {
	t := &idleTrim{log: log}
	t.timer = time.AfterFunc(idleAfter, t.check)
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

func (t *idleTrim) check() {
	if n := t.commands.Load(); n != t.seen.Load() {
		t.seen.Store(n)
		t.timer.Reset(idleAfter)
		return
	}
	t.log.Debug("idle: giving back the pages of code", "after", idleAfter)
	if _, err := memtrim.DropCode(); err != nil {
		t.log.Warn("giving back the pages of idle code", "err", err)
	}
	t.parked.Store(true)
	// A command that came during the trim saw the timer armed and did not
	// re-arm it; count it now.
	if n := t.commands.Load(); n != t.seen.Load() && t.parked.CompareAndSwap(true, false) {
		t.seen.Store(n)
		t.timer.Reset(idleAfter)
	}
}

func (t *idleTrim) stop() {
	if t != nil {
		t.timer.Stop()
	}
}
