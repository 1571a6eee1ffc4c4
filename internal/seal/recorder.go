package seal

import (
	"errors"
	"log/slog"
	"sync"

	"github.com/google/uuid"
)

// recorder calls Generations.Record off the write path: Store hands it the
// generation it has just made durable and returns; a goroutine records the
// newest generation handed over per blob, coalescing whatever arrived while
// it was busy (Record is monotonic, so only the newest matters). close
// records what is still pending.
//
// A crash loses what is pending. That only leaves the record behind the
// state on disk, which weakens rollback detection by the generations
// written since; it never makes genuine state look like a rollback,
// because a generation is handed over only once it is durable.
type recorder struct {
	gens Generations
	id   uuid.UUID
	log  *slog.Logger

	mu      sync.Mutex
	pending map[string]uint64 // newest generation per blob not yet recorded
	handed  map[string]uint64 // newest generation per blob handed over
	failing bool              // the last Record failed; logged once per streak

	wake chan struct{} // buffered: a pending wake-up is enough
	stop chan struct{}
	done chan struct{}
}

func startRecorder(gens Generations, id uuid.UUID, log *slog.Logger) *recorder {
	r := &recorder{
		gens: gens, id: id, log: log,
		pending: map[string]uint64{}, handed: map[string]uint64{},
		wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}),
	}
	go r.run()
	return r
}

// add hands over gen of blob name, which must be durable on disk.
func (r *recorder) add(name string, gen uint64) {
	r.mu.Lock()
	if gen > r.handed[name] {
		r.handed[name] = gen
	}
	if gen > r.pending[name] {
		r.pending[name] = gen
	}
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// last returns the newest generation of name handed over, recorded or not.
func (r *recorder) last(name string) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.handed[name]
}

func (r *recorder) run() {
	defer close(r.done)
	for {
		select {
		case <-r.wake:
			r.flush()
		case <-r.stop:
			return
		}
	}
}

// flush records everything pending. A generation whose Record fails stays
// pending (unless a newer one arrived) and is retried on the next flush.
func (r *recorder) flush() error {
	r.mu.Lock()
	batch := r.pending
	r.pending = map[string]uint64{}
	r.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}

	var errs []error
	for _, name := range Names { // a fixed order, for reproducible records
		gen, ok := batch[name]
		if !ok {
			continue
		}
		if err := r.gens.Record(r.id, name, gen); err != nil {
			errs = append(errs, err)
			r.mu.Lock()
			r.pending[name] = max(r.pending[name], gen)
			r.mu.Unlock()
		}
	}
	err := errors.Join(errs...)
	r.mu.Lock()
	wasFailing := r.failing
	r.failing = err != nil
	r.mu.Unlock()
	switch {
	case err != nil && !wasFailing:
		r.log.Warn("cannot record the generation of TPM state written; rollback of this state is not detected until recording works again (retried on every write)", "err", err)
	case err == nil && wasFailing:
		r.log.Info("recording TPM state generations works again")
	}
	return err
}

// close stops the goroutine and records what is still pending.
func (r *recorder) close() error {
	close(r.stop)
	<-r.done
	return r.flush()
}
