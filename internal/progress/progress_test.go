package progress

import (
	"bytes"
	"testing"
)

func TestBar(t *testing.T) {
	tests := []struct {
		name string
		n    int
		on   bool
		want string
	}{
		{"off draws nothing", 2, false, ""},
		{"no steps draws nothing", 0, true, ""},
		{"drawn, cleared, redrawn", 2, true,
			"\r[                              ] 0/2" + "\r\033[K" +
				"\r[###############               ] 1/2" + "\r\033[K" +
				"\r[##############################] 2/2" + "\r\033[K"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			p := New(&b, tc.n, tc.on)
			for range tc.n {
				p.Clear()
				p.Step()
			}
			p.Clear()
			p.Clear() // a second Clear erases nothing more
			if b.String() != tc.want {
				t.Errorf("drew %q, want %q", b.String(), tc.want)
			}
		})
	}
}

func TestIsTerminal(t *testing.T) {
	if IsTerminal(&bytes.Buffer{}) {
		t.Error("a buffer is a terminal")
	}
}
