package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"vtpm/internal/testutil"
)

// One binary is the CLI, the vTPM instance and the swtpm drop-in, so every
// package linked into it runs its initialisation each time a VM's TPM
// starts, before the TPM can answer QEMU. The tests below guard that cost
// against the next dependency with what is deterministic (what is linked,
// what initialisation allocates); BenchmarkInstanceStart times it.

// heavyPackages are import paths (and everything beneath them) whose
// initialisation and size a vTPM must not pay for at every start. A service
// that needs them belongs in a binary of its own.
var heavyPackages = []string{
	"go.etcd.io",                 // embedded etcd: about 8 ms and 1.5 MB more per start, measured
	"google.golang.org/grpc",     // RPC servers and clients
	"google.golang.org/protobuf", // their messages
	"connectrpc.com",
	"github.com/prometheus", // metrics
	"go.opentelemetry.io",
	"go.uber.org/zap",
	"k8s.io",
	"net/http", // the instance speaks raw sockets; net/http's initialisation and code are large
}

func TestNoHeavyDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, heavy := range heavyPackages {
			if pkg == heavy || strings.HasPrefix(pkg, heavy+"/") {
				t.Errorf("vtpm links %s: every vTPM start would run its initialisation (see heavyPackages)", pkg)
			}
		}
	}
}

// Initialisation budget of the whole binary, from GODEBUG=inittrace=1: the
// sum over packages of the bytes their initialisation allocates, and how
// many packages have initialisation work. Both are deterministic for a
// build, unlike times. At the time of writing: 54 KiB in 90 packages.
const (
	initBytesBudget    = 96 << 10
	initPackagesBudget = 110
)

// initCost is one package's line of GODEBUG=inittrace=1 output.
type initCost struct {
	pkg     string
	clockMS float64
	bytes   int
}

// traceInit runs `vtpm swtpm --version` (the instance's path up to option
// parsing) with GODEBUG=inittrace=1 and returns what each package's
// initialisation cost.
func traceInit(tb testing.TB) []initCost {
	tb.Helper()
	cmd := exec.Command(testutil.Binary(tb), "swtpm", "--version")
	cmd.Env = append(os.Environ(), "GODEBUG=inittrace=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		tb.Fatalf("vtpm swtpm --version: %v\n%s", err, &stderr)
	}
	// init PKG @0.12 ms, 0.034 ms clock, 1408 bytes, 4 allocs
	var costs []initCost
	sc := bufio.NewScanner(&stderr)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 11 || f[0] != "init" || f[6] != "clock," || f[8] != "bytes," {
			continue
		}
		clock, err1 := strconv.ParseFloat(f[4], 64)
		n, err2 := strconv.Atoi(f[7])
		if err1 != nil || err2 != nil {
			tb.Fatalf("inittrace line %q", sc.Text())
		}
		costs = append(costs, initCost{pkg: f[1], clockMS: clock, bytes: n})
	}
	if len(costs) == 0 {
		tb.Fatalf("no inittrace output:\n%s", &stderr)
	}
	return costs
}

func TestInstanceInitBudget(t *testing.T) {
	costs := traceInit(t)
	total := 0
	for _, c := range costs {
		total += c.bytes
	}
	if total > initBytesBudget || len(costs) > initPackagesBudget {
		sort.Slice(costs, func(i, j int) bool { return costs[i].bytes > costs[j].bytes })
		var top []string
		for _, c := range costs[:min(8, len(costs))] {
			top = append(top, fmt.Sprintf("%s %d", c.pkg, c.bytes))
		}
		t.Errorf("package initialisation before a vTPM starts: %d bytes in %d packages; budget %d bytes in %d (largest: %s)",
			total, len(costs), initBytesBudget, initPackagesBudget, strings.Join(top, ", "))
	}
}

// BenchmarkInstanceStart times what QEMU waits for: from starting
// `vtpm swtpm socket` on an existing state until CMD_GET_CAPABILITY is
// answered. It also reports the package initialisation's share:
//
//	go test -run '^$' -bench InstanceStart -benchtime 50x ./cmd/vtpm
func BenchmarkInstanceStart(b *testing.B) {
	exe := testutil.Binary(b)
	dir := b.TempDir()
	b.Setenv("VTPM_HOME", filepath.Join(dir, "home"))
	b.Setenv("VTPM_HOST_TPM", "none")
	state, ctrl := filepath.Join(dir, "state"), filepath.Join(dir, "ctrl")
	start := func() time.Duration {
		t0 := time.Now()
		cmd := exec.Command(exe, "swtpm", "socket", "--tpm2", "--tpmstate", "dir="+state, "--ctrl", "type=unixio,path="+ctrl)
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		var c net.Conn
		var err error
		for deadline := t0.Add(10 * time.Second); ; time.Sleep(200 * time.Microsecond) {
			if c, err = net.Dial("unix", ctrl); err == nil {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("control socket: %v", err)
			}
		}
		defer c.Close()
		rsp := make([]byte, 8)
		if _, err := c.Write(binary.BigEndian.AppendUint32(nil, 1)); err != nil { // CMD_GET_CAPABILITY
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, rsp); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	start() // creates the keystore and the TPM's key protector
	var initMS float64
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		for _, c := range traceInit(b) {
			initMS += c.clockMS
		}
		b.StartTimer()
		start()
	}
	b.ReportMetric(initMS/float64(b.N), "init-ms/op")
}
