package migrate

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
)

// tap is a TCP relay that keeps every byte it passes, both ways: what a
// packet capture between the two hosts would see.
type tap struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	seen   bytes.Buffer
	conns  int
}

func newTap(t *testing.T, ip, target string) *tap {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	p := &tap{ln: ln, target: target}
	t.Cleanup(func() { ln.Close() })
	go p.serve()
	return p
}

func (p *tap) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.conns++
		p.mu.Unlock()
		go p.relay(c)
	}
}

type tapWriter struct{ p *tap }

func (w tapWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.p.seen.Write(b)
}

func (p *tap) relay(c net.Conn) {
	defer c.Close()
	d, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer d.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(io.MultiWriter(d, tapWriter{p}), c); d.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(io.MultiWriter(c, tapWriter{p}), d); c.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	<-done
	<-done
}

func (p *tap) bytes() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return bytes.Clone(p.seen.Bytes())
}

func (p *tap) addr() (host, port string) {
	host, port, _ = net.SplitHostPort(p.ln.Addr().String())
	return host, port
}

// tapped is a destination whose migration stream and NBD traffic go
// through taps.
type tapped struct {
	*Local
	t        *testing.T
	mig, nbd *tap
}

func (d *tapped) Prepare(ctx context.Context, req *PrepareRequest) (*Incoming, error) {
	inc, err := d.Local.Prepare(ctx, req)
	if err != nil {
		return nil, err
	}
	d.mig = newTap(d.t, d.IP, strings.TrimPrefix(inc.MigrateURI, "tcp:"))
	h, p := d.mig.addr()
	inc.MigrateURI = "tcp:" + net.JoinHostPort(h, p)
	if inc.NBDPort != "" {
		d.nbd = newTap(d.t, d.IP, net.JoinHostPort(inc.NBDHost, inc.NBDPort))
		inc.NBDHost, inc.NBDPort = d.nbd.addr()
	}
	return inc, nil
}
