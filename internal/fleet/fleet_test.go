package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"vtpm/internal/errdefs"
	"vtpm/internal/vm"
)

func explain(err error) string { return err.Error() }

func TestRunReportsEveryHost(t *testing.T) {
	do := func(ctx context.Context, host string) (vm.BulkResults, error) {
		switch host {
		case "hangs":
			<-ctx.Done()
			return nil, ctx.Err()
		case "down":
			return nil, errdefs.New(errdefs.ErrUnavailable, "connection refused")
		case "refuses":
			return nil, errdefs.New(errdefs.ErrPermissionDenied, "not admitted")
		}
		return vm.BulkResults{{VM: host + "-1", OK: true}, {VM: host + "-2", Err: errors.New("boom"), Error: "boom"}}, nil
	}
	outs := Run(context.Background(), []string{"a", "hangs", "b", "down", "refuses"}, 50*time.Millisecond, do)
	r := Changes(outs, explain)
	want := Summary{Hosts: 5, Unreachable: 2, HostsFailed: 1, VMs: 4, OK: 2, Failed: 2}
	if r.Summary != want {
		t.Errorf("summary %+v, want %+v", r.Summary, want)
	}
	for i, h := range []string{"a", "hangs", "b", "down", "refuses"} {
		if r.Hosts[i].Host != h {
			t.Errorf("host %d is %s, want %s (the order given)", i, r.Hosts[i].Host, h)
		}
	}
	if !errors.Is(r.Summary.Err("disable TPMs"), errdefs.ErrFailedPrecondition) {
		t.Error("a failed VM does not fail the whole")
	}
	var text bytes.Buffer
	r.WriteText(&text, explain)
	for _, line := range []string{"a: a-1: ok", "a: a-2: failed: boom", "hangs: unreachable:", "down: unreachable: connection refused", "refuses: failed: not admitted"} {
		if !strings.Contains(text.String(), line) {
			t.Errorf("report lacks %q:\n%s", line, text.String())
		}
	}
	var back ChangeReport
	b, _ := json.Marshal(r)
	if err := json.Unmarshal(b, &back); err != nil || back.Summary != want || back.Hosts[1].Reachable {
		t.Errorf("JSON round trip: %v, %+v", err, back.Summary)
	}
}

func TestOnlyUnreachableIsUnavailable(t *testing.T) {
	s := Summary{Hosts: 3, Unreachable: 1, VMs: 10, OK: 10}
	if err := s.Err("x"); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("%v", err)
	}
	if err := (Summary{Hosts: 3, VMs: 1, OK: 1}).Err("x"); err != nil {
		t.Errorf("all well: %v", err)
	}
}

func TestHosts(t *testing.T) {
	for _, tc := range []struct {
		spec string
		want string
		err  bool
	}{
		{"all", "a,b,c", false},
		{"b", "b", false},
		{"a, c,c", "a,c", false},
		{"x", "", true},
		{",", "", true},
	} {
		got, err := Hosts(tc.spec, "a", []string{"b", "c"})
		if (err != nil) != tc.err || strings.Join(got, ",") != tc.want {
			t.Errorf("Hosts(%q) = %v, %v; want %s (error %v)", tc.spec, got, err, tc.want, tc.err)
		}
	}
}

func TestListReport(t *testing.T) {
	outs := []Outcome[[]VM]{
		{Host: "a", Value: []VM{{Name: "w1", UUID: "u1", State: "stopped", TPM: "enabled"}}},
		{Host: "c", Err: &UnreachableError{Host: "c", Err: errors.New("connection refused")}},
	}
	r := Lists(outs, explain)
	if want := (Summary{Hosts: 2, Unreachable: 1, VMs: 1}); r.Summary != want {
		t.Errorf("summary %+v, want %+v", r.Summary, want)
	}
	var text bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"HOST", "w1", "(unreachable: host c is unreachable: connection refused)", "2 hosts, 1 VMs; 1 unreachable"} {
		if !strings.Contains(text.String(), s) {
			t.Errorf("list lacks %q:\n%s", s, text.String())
		}
	}
	if !errors.Is(r.Summary.Err("list"), errdefs.ErrUnavailable) {
		t.Error("an unreachable host does not fail the list")
	}
}
