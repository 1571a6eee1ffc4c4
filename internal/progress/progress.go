// Package progress draws a one-line progress bar, redrawn in place, for
// commands that act on many VMs; off a terminal it draws nothing, so logs
// and pipes get only the commands' own lines.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// IsTerminal reports whether w is a terminal.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// Bar is a bar of n steps on w. Lines printed between steps must follow a
// Clear, which erases the bar; the next Step redraws it.
type Bar struct {
	w         io.Writer
	done, n   int
	on, drawn bool
}

// New draws an empty bar of n steps on w when on (and n > 0); otherwise the
// bar draws nothing.
func New(w io.Writer, n int, on bool) *Bar {
	p := &Bar{w: w, n: n, on: on && n > 0}
	p.draw()
	return p
}

func (p *Bar) draw() {
	if !p.on {
		return
	}
	const width = 30
	fill := width * p.done / p.n
	fmt.Fprintf(p.w, "\r[%s%s] %d/%d", strings.Repeat("#", fill), strings.Repeat(" ", width-fill), p.done, p.n)
	p.drawn = true
}

// Step counts one step done and redraws the bar.
func (p *Bar) Step() {
	p.done++
	p.draw()
}

// Clear erases the bar from its line.
func (p *Bar) Clear() {
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
}
