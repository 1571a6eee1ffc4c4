package hostcheck

import (
	"context"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
)

// serveHost runs a host service with users on a socket in dir until the
// test ends.
func serveHost(t *testing.T, dir string, users []string) string {
	t.Helper()
	b, err := keybroker.Open(filepath.Join(dir, "root"), keystore.Options{HostTPM: "none", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	sock := filepath.Join(dir, "host.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- hostsvc.NewServer(b, &hostsvc.Config{Users: users}, slog.New(slog.DiscardHandler)).Serve(ctx, l)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock
}

type hostServiceCase struct {
	name   string
	socket func(t *testing.T, dir string) string
	status Status
	detail []string
	fix    []errdefs.Action
}

// The host service check: absent, stale, answering, and whom it answers;
// each warning comes with the fix.
func TestHostServiceCheck(t *testing.T) {
	_, errTSS := user.Lookup("tss")
	tests := []hostServiceCase{
		{"no socket", func(t *testing.T, dir string) string { return filepath.Join(dir, "none.sock") },
			Warning, []string{"not running", "none.sock"}, []errdefs.Action{errdefs.ActionHostServiceStart, errdefs.ActionHostServe}},
		{"a socket nobody serves", func(t *testing.T, dir string) string {
			sock := filepath.Join(dir, "stale.sock")
			l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			l.SetUnlinkOnClose(false)
			l.Close()
			return sock
		}, Warning, []string{"does not answer", "stale.sock"}, []errdefs.Action{errdefs.ActionHostServiceStart, errdefs.ActionHostServe}},
		{"not a socket", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "file")
			if err := os.WriteFile(f, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return f
		}, Warning, []string{"is not a socket"}, []errdefs.Action{"", errdefs.ActionHostServiceStart, errdefs.ActionHostServe}},
		{"a user that does not exist", func(t *testing.T, dir string) string {
			return serveHost(t, dir, []string{"tss", "no-such-user-here"})
		}, Warning, []string{"answering at", "no such user here: no-such-user-here"}, []errdefs.Action{""}},
	}
	if errTSS == nil {
		tests = append(tests, hostServiceCase{"answering for tss", func(t *testing.T, dir string) string {
			return serveHost(t, dir, []string{"tss"})
		}, OK, []string{"answering at", "for root, tss"}, nil}, hostServiceCase{"answering, but not for tss", func(t *testing.T, dir string) string {
			return serveHost(t, dir, []string{})
		}, Warning, []string{"for root;", "not for tss"}, []errdefs.Action{""}})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := tt.socket(t, t.TempDir())
			c := HostServiceCheck(sock)
			t.Logf("%+v", c)
			if c.Status != tt.status {
				t.Errorf("status %s, want %s", c.Status, tt.status)
			}
			for _, d := range tt.detail {
				if !strings.Contains(c.Detail, d) {
					t.Errorf("detail %q does not say %q", c.Detail, d)
				}
			}
			var got []errdefs.Action
			for _, r := range c.Fix {
				got = append(got, r.Action)
			}
			if strings.Join(actionStrings(got), ",") != strings.Join(actionStrings(tt.fix), ",") {
				t.Errorf("fix %v, want %v", got, tt.fix)
			}
			for _, r := range c.Fix {
				if r.Action == errdefs.ActionHostServe && r.Args["socket"] != sock {
					t.Errorf("%s names socket %q, want %s", r.Action, r.Args["socket"], sock)
				}
			}
		})
	}
}

func actionStrings(as []errdefs.Action) []string {
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = string(a)
	}
	return out
}
