package apierr

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"connectrpc.com/connect"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/clirender"
	"vtpm/internal/errdefs"
)

// failing answers every GetInfo with err, as a handler does.
type failing struct {
	hostv1connect.UnimplementedHostServiceHandler
	err error
}

func (f failing) GetInfo(context.Context, *connect.Request[hostv1.GetInfoRequest]) (*connect.Response[hostv1.GetInfoResponse], error) {
	return nil, ToConnect(f.err, "b")
}

// roundTrip sends err through a Connect handler and client over HTTP.
func roundTrip(t *testing.T, err error, where string) error {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(hostv1connect.NewHostServiceHandler(failing{err: err}))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	c := hostv1connect.NewHostServiceClient(srv.Client(), srv.URL)
	_, got := c.GetInfo(context.Background(), connect.NewRequest(&hostv1.GetInfoRequest{}))
	if got == nil {
		t.Fatal("call succeeded")
	}
	return FromConnect(got, where)
}

func TestRoundTrip(t *testing.T) {
	missing := errdefs.New(errdefs.ErrNotFound, "no VM web").
		With(errdefs.Do(errdefs.ActionVMList).WithNote("see the VMs"), errdefs.Do(errdefs.ActionGuardianExportCerts, "file", "b.pem").On("here"))
	tests := []struct {
		name      string
		err       error
		where     string
		kind      error
		code      connect.Code
		rendered  string
		remoteFix string
	}{
		{"local service: remedies as sent", fmt.Errorf("open: %w", missing), "", errdefs.ErrNotFound, connect.CodeNotFound,
			"open: no VM web\n  fix: see the VMs: `vtpm vm list -a`\n  fix: `vtpm guardian export --certs-only -o b.pem` (here)", ""},
		{"another host: its remedies run there", missing, "on host b", errdefs.ErrNotFound, connect.CodeNotFound,
			"no VM web\n  fix: see the VMs: `vtpm vm list -a` (on host b)\n  fix: `vtpm guardian export --certs-only -o b.pem` (on host b)", ""},
		{"conflict", errdefs.New(errdefs.ErrConflict, "busy"), "", errdefs.ErrConflict, connect.CodeAborted, "busy", ""},
		{"no kind", errors.New("boom"), "", nil, connect.CodeUnknown, "boom", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := roundTrip(t, tt.err, tt.where)
			var e *Error
			if !errors.As(got, &e) {
				t.Fatalf("FromConnect returned %T %v", got, got)
			}
			if e.Code != tt.code {
				t.Errorf("code %v, want %v", e.Code, tt.code)
			}
			if errdefs.KindOf(got) != tt.kind {
				t.Errorf("kind %v, want %v", errdefs.KindOf(got), tt.kind)
			}
			if e.Host != "b" {
				t.Errorf("host %q, want b", e.Host)
			}
			if r := clirender.Error(got); r != tt.rendered {
				t.Errorf("rendered\n%s\nwant\n%s", r, tt.rendered)
			}
		})
	}
}

// TestHostKept: an error that crossed from host c through host b names c.
func TestHostKept(t *testing.T) {
	fromC := &Error{Code: connect.CodePermissionDenied, Kind: errdefs.ErrPermissionDenied, Host: "c", Msg: "refused"}
	got := roundTrip(t, fmt.Errorf("host c: %w", fromC), "")
	var e *Error
	if !errors.As(got, &e) || e.Host != "c" || e.Msg != "host c: refused" || !errors.Is(got, errdefs.ErrPermissionDenied) {
		t.Errorf("got %#v", got)
	}
}

func TestCodes(t *testing.T) {
	for _, k := range kinds {
		if got := kindOf("", Code(k.kind)); got != k.kind {
			t.Errorf("%v → %v → %v", k.kind, Code(k.kind), got)
		}
		if got := kindOf(KindName(k.kind), connect.CodeUnknown); got != k.kind {
			t.Errorf("%q → %v", KindName(k.kind), got)
		}
	}
	if kindOf("", connect.CodeUnauthenticated) != errdefs.ErrPermissionDenied {
		t.Error("unauthenticated is not a permission failure")
	}
}
