package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"vtpm/internal/hostcheck"
	"vtpm/internal/qemutest"
)

const migrateSection = "9. Live migration: downtime added by the TPM state (QEMU guest, destination directory empty)"

// migrationDowntime migrates the same small guest between two QEMU
// processes on this machine, without a TPM and with each implementation's
// TPM (the destination TPM on an empty state directory, vtpm without
// --migration-key), interleaved, and reads QEMU's own `downtime` (ms,
// query-migrate on the source once completed). The rows are the downtime
// with the TPM, and the same minus the median without one.
func (b *bench) migrationDowntime() ([]row, error) {
	if b.cfg.migrations <= 0 {
		return []row{{section: migrateSection, skip: "-migrations 0"}}, nil
	}
	if err := hostcheck.QEMUUsable(); err != nil {
		return []row{{section: migrateSection, skip: fmt.Sprintf("QEMU cannot run guests here: %v", err)}}, nil
	}
	code, vars := hostcheck.Firmware(false)
	if missing := hostcheck.MissingFirmware(code, vars); len(missing) > 0 {
		return []row{{section: migrateSection, skip: fmt.Sprintf("OVMF firmware %v is not installed", missing)}}, nil
	}
	b.progress("live migration downtime: %d × (no TPM, swtpm, vtpm), each a guest boot and a migration", b.cfg.migrations)
	var none []float64
	var with [2][]float64
	for i := range b.cfg.migrations {
		d, err := b.migrateOnce(-1, i)
		if err != nil {
			return nil, fmt.Errorf("without a TPM: %w", err)
		}
		none = append(none, d)
		for _, k := range order(i) {
			d, err := b.migrateOnce(k, i)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", b.impls[k].name, err)
			}
			with[k] = append(with[k], d)
		}
	}
	base := median(slices.Sorted(slices.Values(none)))
	var added [2][]float64
	for k := range with {
		for _, d := range with[k] {
			added[k] = append(added[k], d-base)
		}
	}
	return []row{
		{section: migrateSection, name: "QEMU downtime, guest with the TPM", unit: "ms", s: with,
			note: fmt.Sprintf("the same guest without a TPM: median %.0f ms (%d runs)", base, len(none))},
		{section: migrateSection, name: "downtime added by the TPM (minus the no-TPM median)", unit: "ms", s: added},
	}, nil
}

// migrateOnce boots a guest on implementation k's TPM (k < 0: no TPM),
// migrates it to a fresh QEMU whose TPM starts on an empty directory, and
// returns QEMU's downtime in ms.
func (b *bench) migrateOnce(k, i int) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	tb := &benchTB{}
	defer tb.cleanup()
	dir, err := os.MkdirTemp("", "vb")
	if err != nil {
		return 0, err
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	start := func(name string, incoming string) (*qemutest.VM, error) {
		cfg := qemutest.Config{Name: fmt.Sprintf("%s-%d", name, i), Incoming: incoming, Memory: "256M"}
		if k >= 0 {
			im := b.impls[k]
			tpm, err := qemutest.StartTPM(ctx, tb, qemutest.TPMConfig{
				Command:  im.argv[:len(im.argv)-1], // without "socket"
				StateDir: filepath.Join(dir, name),
				Env:      append(slices.Clone(im.env), "VTPM_HOST_TPM=none"),
			})
			if err != nil {
				return nil, err
			}
			cfg.TPMSocket = tpm.Socket
		}
		return qemutest.Start(ctx, tb, cfg)
	}
	src, err := start("src", "")
	if err != nil {
		return 0, err
	}
	uri := "unix:" + filepath.Join(dir, "mig.sock")
	dst, err := start("dst", uri)
	if err != nil {
		return 0, err
	}
	if err := src.Migrate(ctx, uri); err != nil {
		return 0, fmt.Errorf("%w%s", err, tb.logs())
	}
	if err := dst.WaitStatus(ctx, "running"); err != nil {
		return 0, err
	}
	raw, err := src.QMP(ctx, "query-migrate", nil)
	if err != nil {
		return 0, err
	}
	var st struct {
		Downtime *float64 `json:"downtime"`
	}
	if err := json.Unmarshal(raw, &st); err != nil || st.Downtime == nil {
		return 0, fmt.Errorf("query-migrate reports no downtime: %s", raw)
	}
	return *st.Downtime, nil
}

// benchTB is the part of testing.TB that qemutest uses to start TPMs and
// guests (temporary directories, cleanups, log lines) for a program that is
// not a test. Anything else it is asked panics through the nil interface.
type benchTB struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
	lines    []string
}

func (t *benchTB) Helper() {}

func (t *benchTB) Cleanup(f func()) {
	t.mu.Lock()
	t.cleanups = append(t.cleanups, f)
	t.mu.Unlock()
}

func (t *benchTB) TempDir() string {
	d, err := os.MkdirTemp("", "vb")
	if err != nil {
		panic(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func (t *benchTB) Logf(format string, args ...any) {
	t.mu.Lock()
	t.lines = append(t.lines, fmt.Sprintf(format, args...))
	t.mu.Unlock()
}

func (t *benchTB) Failed() bool { return false }

func (t *benchTB) logs() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := ""
	for _, l := range t.lines {
		s += "\n" + l
	}
	return s
}

// cleanup runs the cleanups, last registered first, as testing does.
func (t *benchTB) cleanup() {
	t.mu.Lock()
	fs := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}
