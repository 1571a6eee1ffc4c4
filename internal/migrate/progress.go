package migrate

import (
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"

	"vtpm/internal/vm"
)

// Progress is a migration's state as the source sees it. Byte counts are
// bytes; times are milliseconds.
type Progress struct {
	VM    string `json:"vm"`
	Host  string `json:"host"`
	Phase string `json:"phase"` // pre-flight, prepare, disks, memory, switchover, commit, retire, done, failed
	// Status is QEMU's migration status during "memory".
	Status           string  `json:"status,omitempty"`
	DiskDone         int64   `json:"disk_done,omitempty"`
	DiskTotal        int64   `json:"disk_total,omitempty"`
	RAMTransferred   int64   `json:"ram_transferred,omitempty"`
	RAMRemaining     int64   `json:"ram_remaining,omitempty"`
	RAMTotal         int64   `json:"ram_total,omitempty"`
	DirtyRate        int64   `json:"dirty_bytes_per_second,omitempty"`
	MBps             float64 `json:"mbps,omitempty"`
	TotalTime        int64   `json:"total_time_ms,omitempty"`
	ExpectedDowntime int64   `json:"expected_downtime_ms,omitempty"`
	Downtime         int64   `json:"downtime_ms,omitempty"`
}

// Line is the progress as one line of text.
func (p Progress) Line() string {
	switch p.Phase {
	case "disks":
		return fmt.Sprintf("%s → %s: disks %s / %s", p.VM, p.Host, vm.FormatSize(p.DiskDone), vm.FormatSize(p.DiskTotal))
	case "memory", "switchover":
		s := fmt.Sprintf("%s → %s: memory %s sent, %s left, dirty %s/s, %.0f Mbit/s", p.VM, p.Host,
			vm.FormatSize(p.RAMTransferred), vm.FormatSize(p.RAMRemaining), vm.FormatSize(p.DirtyRate), p.MBps)
		if p.Downtime > 0 {
			return s + fmt.Sprintf(", downtime %d ms", p.Downtime)
		}
		if p.ExpectedDowntime > 0 {
			s += fmt.Sprintf(", expected downtime %d ms", p.ExpectedDowntime)
		}
		return s
	}
	return fmt.Sprintf("%s → %s: %s", p.VM, p.Host, p.Phase)
}

// Writer prints progress: on a terminal one line redrawn in place; as
// JSON one object per line, at phase changes and at most once a second
// within one; otherwise a line per phase.
type Writer struct {
	w        io.Writer
	json     bool
	terminal bool

	mu    sync.Mutex
	phase string
	last  time.Time
	drawn bool
}

// NewWriter returns a progress writer on w.
func NewWriter(w io.Writer, asJSON, terminal bool) *Writer {
	return &Writer{w: w, json: asJSON, terminal: terminal && !asJSON}
}

// Report prints p; it is an Options.Progress.
func (pw *Writer) Report(p Progress) {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	changed := p.Phase != pw.phase
	pw.phase = p.Phase
	switch {
	case pw.json:
		if !changed && time.Since(pw.last) < time.Second {
			return
		}
		pw.last = time.Now()
		b, _ := json.Marshal(p)
		fmt.Fprintf(pw.w, "%s\n", b)
	case pw.terminal:
		fmt.Fprintf(pw.w, "\r\033[K%s", p.Line())
		pw.drawn = true
	case changed:
		fmt.Fprintln(pw.w, p.Line())
	}
}

// Clear ends a line drawn on a terminal.
func (pw *Writer) Clear() {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	if pw.drawn {
		fmt.Fprint(pw.w, "\r\033[K")
		pw.drawn = false
	}
}

// WriteText writes the result as text.
func (r *Result) WriteText(w io.Writer) {
	fmt.Fprintf(w, "migrated VM %s to %s: %d ms in all, the guest stopped for %d ms; %s of memory and %s of disks sent\n",
		r.VM, r.Host, r.TotalTime, r.Downtime, vm.FormatSize(r.RAMBytes), vm.FormatSize(r.DiskBytes))
	if r.Granted != "" {
		fmt.Fprintf(w, "the TPM's key protector now admits %s\n", r.Granted)
	}
	if r.Backup != "" {
		fmt.Fprintf(w, "its TPM state is kept here as a backup in %s\n", r.Backup)
	}
}
