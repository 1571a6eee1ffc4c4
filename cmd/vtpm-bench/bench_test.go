package main

import (
	"io/fs"
	"os/exec"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"vtpm/internal/libtpms"
	"vtpm/internal/testutil"
)

// BenchmarkDataChannel is sections 1 and 2 of vtpm-bench as Go benchmarks:
// one command over the raw TCP data channel of swtpm and of vtpm, each run
// with the same options. Compare the two sub-benchmarks of each command.
// As in vtpm-bench, GetRandom and PCR_Extend are built once and replayed.
// The sub-benchmarks run one after the other, not interleaved, so machine
// load shifts their ratio; vtpm-bench is the tool for ratios.
func BenchmarkDataChannel(b *testing.B) {
	testutil.Need(b, "swtpm")
	sw, _ := exec.LookPath("swtpm")
	env := []string{"VTPM_HOME=" + b.TempDir()}
	impls := []*impl{
		{name: "swtpm", argv: []string{sw, "socket"}, env: env},
		{name: "vtpm", argv: []string{testutil.Binary(b), "swtpm", "socket"}, env: env},
	}
	replay := func(build func(transport.TPM) error) func(*wire, tpm2.NamedHandle, int) error {
		var cmd []byte
		return func(w *wire, _ tpm2.NamedHandle, _ int) error {
			if cmd == nil {
				rec := &recorder{TPM: w}
				err := build(rec)
				cmd = rec.last
				return err
			}
			rsp, err := w.Send(cmd)
			if err != nil {
				return err
			}
			return responseCode(rsp)
		}
	}
	for _, im := range impls {
		for _, op := range []struct {
			name string
			run  func(w *wire, nv tpm2.NamedHandle, i int) error
		}{
			{"GetRandom", replay(getRandom)},
			{"PCRExtend", replay(pcrExtend)},
			{"NVWrite", nvWrite},
		} {
			b.Run(op.name+"/"+im.name, func(b *testing.B) {
				s, err := startSession(im, b.TempDir(), nil)
				if err != nil {
					b.Fatal(err)
				}
				defer s.close(true)
				nv, err := nvDefine(s.w)
				if err != nil {
					b.Fatal(err)
				}
				if err := op.run(s.w, nv, -1); err != nil { // warm up (and record)
					b.Fatal(err)
				}
				i := 0
				for b.Loop() {
					if err := op.run(s.w, nv, i); err != nil {
						b.Fatal(err)
					}
					i++
				}
			})
		}
	}
}

// memStorage keeps libtpms' state in memory.
type memStorage struct {
	mu    sync.Mutex
	blobs map[string][]byte
}

func (m *memStorage) Init() error { return nil }

func (m *memStorage) Load(name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.blobs[name]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return b, nil
}

func (m *memStorage) Store(name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.blobs[name] = data
	return nil
}

func (m *memStorage) Delete(name string, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.blobs, name)
	return nil
}

// BenchmarkLibtpms runs commands on vtpm's libtpms binding in process, with
// no socket and no state store: what remains is libtpms and cgo. Profile it
// with -cpuprofile to see where vtpm's share of a data-channel round trip goes.
func BenchmarkLibtpms(b *testing.B) {
	t, err := libtpms.Open(&memStorage{blobs: map[string][]byte{}})
	if err != nil {
		b.Fatal(err)
	}
	defer t.Close()
	if err := t.Init(); err != nil {
		b.Fatal(err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(t); err != nil {
		b.Fatal(err)
	}
	// Build each command once with go-tpm, then time only Process.
	rec := &recorder{TPM: t}
	if err := getRandom(rec); err != nil {
		b.Fatal(err)
	}
	getRandomCmd := rec.last
	if err := pcrExtend(rec); err != nil {
		b.Fatal(err)
	}
	pcrExtendCmd := rec.last
	for _, c := range []struct {
		name string
		cmd  []byte
	}{{"GetRandom", getRandomCmd}, {"PCRExtend", pcrExtendCmd}} {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := t.Process(c.cmd); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
