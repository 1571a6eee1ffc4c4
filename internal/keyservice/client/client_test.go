package client

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"vtpm/internal/apierr"
	"vtpm/internal/errdefs"
)

func TestUnanswered(t *testing.T) {
	noQuorum := apierr.ToConnect(errdefs.New(errdefs.ErrUnavailable, "key service has no quorum (read hosts/a)"), "n3")
	denied := apierr.ToConnect(errdefs.New(errdefs.ErrPermissionDenied, "host a is revoked"), "n1")
	tests := []struct {
		name  string
		err   error
		next  bool
		state string
	}{
		{"refused connection", errors.New("dial tcp 127.0.0.1:1: connect: connection refused"), true, "unreachable"},
		{"transport failure", connect.NewError(connect.CodeUnavailable, errors.New("EOF")), true, "unreachable"},
		{"the node has no quorum", noQuorum, true, "no quorum"},
		{"no answer in time", connect.NewError(connect.CodeDeadlineExceeded, errors.New("deadline")), true, "no answer in time"},
		{"a decision", denied, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state, next := unanswered(tt.err)
			if next != tt.next || !strings.Contains(state, tt.state) {
				t.Errorf("unanswered = %q, %v; want %q, %v", state, next, tt.state, tt.next)
			}
		})
	}
}

func TestBundleRoundTrip(t *testing.T) {
	key, _, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewBundle("alice", "admin", []string{"https://127.0.0.1:1", "https://127.0.0.1:2"}, []byte{}, []byte{}, key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "alice.json")
	if err := b.Write(p); err != nil {
		t.Fatal(err)
	}
	got, err := ReadBundle(p)
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != "alice" || len(got.Endpoints) != 2 || string(got.Key) != string(b.Key) {
		t.Errorf("read back %+v", got)
	}
	if _, err := ReadBundle(filepath.Join(t.TempDir(), "none.json")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("a missing bundle: %v, want not found", err)
	}
}
