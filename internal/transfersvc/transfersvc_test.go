package transfersvc

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/errdefs"
	"vtpm/internal/hostcheck"
	"vtpm/internal/hostd"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/testutil"
	"vtpm/internal/transfer"
	"vtpm/internal/vm"
)

// receiver serves a host service's TransferService over HTTP/2 and TLS,
// on a data root of its own, and returns a destination that calls it.
func receiver(t *testing.T) (*vm.Registry, transfer.Destination) {
	t.Helper()
	t.Setenv("VTPM_HOST_TPM", "none")
	root := t.TempDir()
	s, err := hostd.New(hostd.Options{DataRoot: root, Name: "b", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	for _, svc := range Services(s) {
		if svc.Remote {
			mux.Handle(svc.Path, svc.Handler)
		}
	}
	srv := httptest.NewUnstartedServer(mux)
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	d := &peerDestination{name: "b", client: hostv1connect.NewTransferServiceClient(srv.Client(), srv.URL),
		peerErr: func(_ string, err error) error { return apierr.FromConnect(err, "on host b") }}
	return (&service{s: s}).registry(), d
}

func sender(t *testing.T) *vm.Registry {
	t.Helper()
	if _, err := os.Stat(filepath.Join(hostcheck.FirmwareDir, hostcheck.OVMFVarsMS)); err != nil {
		testutil.Missing(t, "OVMF is not installed: %v", err)
	}
	root := t.TempDir()
	h := vm.NewRegistry(root, func() (*keybroker.Broker, error) {
		return keybroker.Open(root, keystore.Options{HostTPM: "none"})
	})
	h.Log = slog.New(slog.DiscardHandler)
	return h
}

// flipping changes the first occurrence of what in the stream it writes.
type flipping struct {
	transfer.Destination
	what []byte
}

type flipper struct {
	w    io.Writer
	what []byte
	done bool
}

func (f *flipper) Write(p []byte) (int, error) {
	if i := bytes.Index(p, f.what); i >= 0 && !f.done {
		p = bytes.Clone(p)
		p[i] ^= 1
		f.done = true
	}
	return f.w.Write(p)
}

func (d flipping) Receive(ctx context.Context, r *transfer.Request, send func(io.Writer) error) (*transfer.Arrived, error) {
	return d.Destination.Receive(ctx, r, func(w io.Writer) error { return send(&flipper{w: w, what: d.what}) })
}

// TestBundleOverTheAPI: a VM copied through TransferService arrives whole;
// a stream changed on the way is refused as data loss, and the receiving
// host registers nothing and keeps nothing.
func TestBundleOverTheAPI(t *testing.T) {
	a := sender(t)
	b, dst := receiver(t)
	disk := filepath.Join(t.TempDir(), "d.raw")
	content := bytes.Repeat([]byte("sector of the guest's disk "), 200000) // several chunks
	if err := os.WriteFile(disk, content, 0o600); err != nil {
		t.Fatal(err)
	}
	on := true
	made, err := a.Create(vm.CreateOptions{Name: "w", OS: vm.Linux, TPM: &on, Disk: disk})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	_, err = transfer.Send(ctx, a, made.VM, flipping{dst, []byte("sector of")}, transfer.Options{Op: vm.OpCopy, To: "b", TPM: vm.TPMNew})
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("a changed stream: %v; want data loss", err)
	}
	if es, _ := b.Entries(); len(es) != 0 {
		t.Errorf("b registered %v from a changed stream", es)
	}
	for _, d := range []string{transfer.IncomingDir(b), b.VMsDir()} {
		if left, _ := os.ReadDir(d); len(left) != 0 {
			t.Errorf("a changed stream left %v in %s", left, d)
		}
	}

	res, err := transfer.Send(ctx, a, made.VM, dst, transfer.Options{Op: vm.OpCopy, To: "b", TPM: vm.TPMNew})
	if err != nil {
		t.Fatal(err)
	}
	v, err := b.Open("w")
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(v.File(v.Config.Disks[0].Path))
	if err != nil || !bytes.Equal(got, content) {
		t.Errorf("the disk arrived with %d bytes (%v), want %d", len(got), err, len(content))
	}
	if res.TPM != "enabled" || res.UUID == made.VM.Config.UUID.String() {
		t.Errorf("copy: %+v", res.Arrived)
	}
}
