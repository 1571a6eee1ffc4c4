package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// config holds the iteration counts (flags).
type config struct {
	rtt, nv, ecc, rsa int // data-channel iterations per implementation
	warmup            int // unrecorded iterations before each data-channel series
	starts            int // process starts per implementation and state kind
	mem               int // idle instances measured per implementation
	many, manyRounds  int // instances started at once, and how often
	poll              time.Duration
	settle            time.Duration // idle time before reading smaps_rollup
	setups            int           // full manufactures per implementation
	keyOps            int           // in-process key operations of each kind
	cliGrants         int           // `vtpm protector grant` runs
	rewraps           int           // rounds of re-wrapping rewrapN protectors
	rewrapN           int           // protectors re-wrapped per round
	keyStarts         int           // process starts with each kind of key
	migrations        int           // live migrations per implementation (and without a TPM)
	moves             int           // offline moves, and cp -r runs
	hostMigrations    int           // vm migrate runs, with a vTPM and without a TPM each
	moveMiB           int           // the moved VM's disk, MiB
	ksReleases        int           // key releases per series (0 skips section 13)
	ksHosts           int           // hosts releasing at once
	ksKills           int           // kill -9 recoveries, each on a fresh cluster of 3
}

// row is one line of the results table. Index 0 of the samples is swtpm,
// index 1 vtpm.
type row struct {
	section string
	name    string
	unit    string
	s       [2][]float64
	target  float64 // the largest passing ratio vtpm/swtpm; 0: reported only
	note    string

	// vtpmOnly rows have no swtpm equivalent: their samples are in s[1],
	// and limit (in unit; 0: reported only) is the largest passing median.
	vtpmOnly bool
	limit    float64
	// skip, when set, says why the section was not measured; such a row
	// has no samples.
	skip string
	// table, when set, is the section's own rendered table (its columns
	// fit no comparison with swtpm); such a row has no samples.
	table string

	// Set by judge.
	sum    [2]summary
	ratio  float64 // median(vtpm) / median(swtpm)
	lo, hi float64 // its 95% interval
	pass   bool
	result string
}

// bench runs the measurements; impls[0] is swtpm, impls[1] vtpm.
type bench struct {
	impls           [2]*impl
	swtpmSetup      string // swtpm's swtpm_setup; "" if not found
	keyserviceBin   string // vtpm-keyservice, for section 13
	keyserviceShown string // the same as given: the report names no local directories
	base            string
	cfg             config
	golden          *golden
	log             io.Writer
}

// order alternates which implementation goes first, so that neither always
// runs on a cache warmed (or a CPU boosted) by the other.
func order(i int) [2]int {
	if i%2 == 0 {
		return [2]int{0, 1}
	}
	return [2]int{1, 0}
}

func (b *bench) progress(format string, args ...any) {
	fmt.Fprintf(b.log, "vtpm-bench: "+format+"\n", args...)
}

func scaled(d time.Duration, unit time.Duration) float64 { return float64(d) / float64(unit) }

// sessions starts one session of each implementation on the golden state.
func (b *bench) sessions() ([2]*session, func(), error) {
	var ss [2]*session
	cleanup := func() {
		for _, s := range ss {
			if s != nil {
				s.close(true)
			}
		}
	}
	for k, im := range b.impls {
		s, err := startSession(im, b.base, b.golden)
		if err != nil {
			cleanup()
			return ss, nil, err
		}
		ss[k] = s
	}
	return ss, cleanup, nil
}

// interleave runs op n times on each implementation k, alternating, after
// warm-up iterations that are not recorded (their i is negative).
func (b *bench) interleave(n int, unit time.Duration, op func(k, i int) (time.Duration, error)) ([2][]float64, error) {
	var out [2][]float64
	for i := -b.cfg.warmup; i < n; i++ {
		for _, k := range order(i + b.cfg.warmup) {
			d, err := op(k, i)
			if err != nil {
				return out, fmt.Errorf("%s: %w", b.impls[k].name, err)
			}
			if i >= 0 {
				out[k] = append(out[k], scaled(d, unit))
			}
		}
	}
	return out, nil
}

// latency is measurement 1: round trips on the data channel.
func (b *bench) latency() ([]row, error) {
	ss, cleanup, err := b.sessions()
	if err != nil {
		return nil, err
	}
	defer cleanup()
	const sec = "1. Data-channel round trip"
	var rows []row
	for _, op := range []struct {
		name string
		do   func(transport.TPM) error
	}{
		{"TPM2_GetRandom(32)", getRandom},
		{"TPM2_PCR_Extend (SHA-256, PCR 16)", pcrExtend},
	} {
		// go-tpm builds the command once; it is the same every time (a
		// password session has no nonces), and replaying it keeps the
		// client's marshalling and garbage out of the timed loop.
		var cmds [2][]byte
		for k, s := range ss {
			rec := &recorder{TPM: s.w}
			if err := op.do(rec); err != nil {
				return nil, fmt.Errorf("%s: %w", b.impls[k].name, err)
			}
			cmds[k] = rec.last
		}
		b.progress("%s: %d × 2", op.name, b.cfg.rtt)
		s, err := b.interleave(b.cfg.rtt, time.Microsecond, func(k, _ int) (time.Duration, error) {
			rsp, err := ss[k].w.Send(cmds[k])
			if err == nil {
				err = responseCode(rsp)
			}
			return ss[k].w.last, err
		})
		if err != nil {
			return nil, err
		}
		rows = append(rows, row{section: sec, name: op.name, unit: "µs", s: s, target: 1})
	}
	return rows, nil
}

// nvWrites is measurement 2.
func (b *bench) nvWrites() ([]row, error) {
	ss, cleanup, err := b.sessions()
	if err != nil {
		return nil, err
	}
	defer cleanup()
	var nv [2]tpm2.NamedHandle
	for k, s := range ss {
		h, err := nvDefine(s.w)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", b.impls[k].name, err)
		}
		nv[k] = h
	}
	b.progress("TPM2_NV_Write: %d × 2", b.cfg.nv)
	s, err := b.interleave(b.cfg.nv, time.Millisecond, func(k, i int) (time.Duration, error) {
		err := nvWrite(ss[k].w, nv[k], i)
		return ss[k].w.last, err
	})
	if err != nil {
		return nil, err
	}
	return []row{{
		section: "2. NV write (persists state)", name: "TPM2_NV_Write, 64 bytes, ordinary index",
		unit: "ms", s: s, target: 2,
		note: "vtpm seals and fsyncs each write; swtpm 0.7.1 writes without fsync",
	}}, nil
}

// createPrimaries is measurement 3.
func (b *bench) createPrimaries() ([]row, error) {
	ss, cleanup, err := b.sessions()
	if err != nil {
		return nil, err
	}
	defer cleanup()
	var rows []row
	for _, kind := range []struct {
		name     string
		n        int
		template func(int) tpm2.TPMTPublic
	}{
		{"TPM2_CreatePrimary ECC P-256 (+ flush)", b.cfg.ecc, eccTemplate},
		{"TPM2_CreatePrimary RSA-2048 (+ flush)", b.cfg.rsa, rsaTemplate},
	} {
		b.progress("%s: %d × 2", kind.name, kind.n)
		pubs := [2]map[int][]byte{{}, {}}
		s, err := b.interleave(kind.n, time.Millisecond, func(k, i int) (time.Duration, error) {
			pub, d, err := createPrimary(ss[k].w, kind.template(i))
			pubs[k][i] = pub
			return d, err
		})
		if err != nil {
			return nil, err
		}
		note := "same seeds and templates: both derive identical keys"
		for i, p := range pubs[0] {
			if !bytes.Equal(p, pubs[1][i]) {
				note = "WARNING: the two implementations derived different keys, so the work differs"
				break
			}
		}
		rows = append(rows, row{section: "3. Primary key creation", name: kind.name, unit: "ms", s: s, target: 1, note: note})
	}
	return rows, nil
}

// startOnce times one process start: spawn, poll-connect the control
// socket, CMD_GET_CAPABILITY answered (capT), then CMD_INIT answered (initT).
func (b *bench) startOnce(im *impl, o procOpts) (capT, initT time.Duration, err error) {
	t0 := time.Now()
	p, err := spawn(im, o)
	if err != nil {
		return 0, 0, err
	}
	if err := p.connectCtrl(b.cfg.poll, 20*time.Second); err != nil {
		return 0, 0, err
	}
	if err := p.getCapability(); err != nil {
		return 0, 0, err
	}
	capT = time.Since(t0)
	if err := p.init(); err != nil {
		return 0, 0, err
	}
	initT = time.Since(t0)
	return capT, initT, p.stop()
}

// startup is measurement 4.
func (b *bench) startup() ([]row, error) {
	const sec = "4. Process start → control channel answers"
	// The existing state is what a cleanly stopped VM leaves behind.
	var existing [2]procOpts
	for k, im := range b.impls {
		s, err := startSession(im, b.base, nil)
		if err != nil {
			return nil, err
		}
		if err := shutdownClear(s.w); err != nil {
			s.close(true)
			return nil, fmt.Errorf("%s: %w", im.name, err)
		}
		existing[k] = s.p.opts
		existing[k].dataPort = 0
		if err := s.close(false); err != nil {
			return nil, err
		}
		defer removeInstanceDir(existing[k])
	}
	var rows []row
	for _, fresh := range []bool{true, false} {
		kind := "existing state"
		if fresh {
			kind = "fresh state dir"
		}
		b.progress("process start, %s: %d × 2", kind, b.cfg.starts)
		var capS, initS [2][]float64
		for i := range b.cfg.starts {
			for _, k := range order(i) {
				o := existing[k]
				if fresh {
					var err error
					if o, err = newInstanceDir(b.base); err != nil {
						return nil, err
					}
				}
				c, in, err := b.startOnce(b.impls[k], o)
				if fresh {
					removeInstanceDir(o)
				}
				if err != nil {
					return nil, err
				}
				capS[k] = append(capS[k], scaled(c, time.Millisecond))
				initS[k] = append(initS[k], scaled(in, time.Millisecond))
			}
		}
		initNote := "CMD_INIT loads the stored state"
		if fresh {
			initNote = "CMD_INIT manufactures the TPM and stores its first state"
		}
		rows = append(rows,
			row{section: sec, name: "start → GET_CAPABILITY answered, " + kind, unit: "ms", s: capS, target: 1},
			row{section: sec, name: "start → GET_CAPABILITY + INIT answered, " + kind, unit: "ms", s: initS, target: 1, note: initNote},
		)
	}
	return rows, nil
}

// smaps reads /proc/PID/smaps_rollup (values in kB).
func smaps(pid int) (map[string]float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return nil, fmt.Errorf("read memory use: %w", err)
	}
	defer f.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 3 && fields[2] == "kB" {
			v, err := strconv.ParseFloat(fields[1], 64)
			if err == nil {
				m[strings.TrimSuffix(fields[0], ":")] = v
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read memory use: %w", err)
	}
	if _, ok := m["Pss"]; !ok {
		return nil, errors.New("smaps_rollup has no Pss line")
	}
	m["Private"] = m["Private_Clean"] + m["Private_Dirty"]
	return m, nil
}

// memory is measurement 5: one idle instance at a time, so that no page is
// shared with the other implementation.
func (b *bench) memory() ([]row, error) {
	keys := []struct{ key, name string }{
		{"Rss", "RSS"}, {"Pss", "PSS"}, {"Private", "USS (private pages only)"},
		{"Pss_Anon", "PSS, anonymous (heap, stacks)"}, {"Pss_File", "PSS, file-backed (code, libraries)"},
	}
	s := make([][2][]float64, len(keys))
	b.progress("idle memory: %d × 2", b.cfg.mem)
	for i := range b.cfg.mem {
		for _, k := range order(i) {
			ss, err := startSession(b.impls[k], b.base, b.golden)
			if err != nil {
				return nil, err
			}
			time.Sleep(b.cfg.settle)
			m, err := smaps(ss.p.pid())
			if err = errors.Join(err, ss.close(true)); err != nil {
				return nil, err
			}
			for j, key := range keys {
				s[j][k] = append(s[j][k], m[key.key]/1024)
			}
		}
	}
	var rows []row
	for j, key := range keys {
		r := row{section: "5. Idle instance memory (after INIT + TPM2_Startup)", name: key.name, unit: "MiB", s: s[j]}
		if key.key == "Pss" {
			r.target = 2
		}
		rows = append(rows, r)
	}
	return rows, nil
}

// manyOnce starts b.cfg.many instances at once and returns the time until
// all have answered CMD_INIT (fresh state: each manufactures a TPM) and their
// total RSS and PSS in kB.
func (b *bench) manyOnce(im *impl) (took time.Duration, rss, pss float64, err error) {
	opts := make([]procOpts, b.cfg.many)
	for i := range opts {
		if opts[i], err = newInstanceDir(b.base); err != nil {
			return 0, 0, 0, err
		}
	}
	defer func() {
		for _, o := range opts {
			removeInstanceDir(o)
		}
	}()
	procs := make([]*proc, len(opts))
	errs := make([]error, len(opts))
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range opts {
		wg.Go(func() {
			p, err := spawn(im, opts[i])
			if err != nil {
				errs[i] = err
				return
			}
			procs[i] = p
			if err := p.connectCtrl(b.cfg.poll*10, 60*time.Second); err != nil {
				errs[i] = err
				return
			}
			errs[i] = p.init()
		})
	}
	wg.Wait()
	took = time.Since(t0)
	err = errors.Join(errs...)
	if err == nil {
		for _, p := range procs {
			m, serr := smaps(p.pid())
			if serr != nil {
				err = serr
				break
			}
			rss += m["Rss"]
			pss += m["Pss"]
		}
	}
	for i, p := range procs {
		if p != nil {
			wg.Go(func() { errs[i] = p.stop() })
		}
	}
	wg.Wait()
	return took, rss, pss, errors.Join(err, errors.Join(errs...))
}

// many is measurement 6.
func (b *bench) many() ([]row, error) {
	var t, rss, pss [2][]float64
	for r := range b.cfg.manyRounds {
		for _, k := range order(r) {
			b.progress("%d %s instances at once (round %d of %d)", b.cfg.many, b.impls[k].name, r+1, b.cfg.manyRounds)
			took, r, p, err := b.manyOnce(b.impls[k])
			if err != nil {
				return nil, err
			}
			t[k] = append(t[k], scaled(took, time.Millisecond))
			rss[k] = append(rss[k], r/1024)
			pss[k] = append(pss[k], p/1024)
		}
	}
	sec := fmt.Sprintf("6. %d instances started at once (fresh state dirs)", b.cfg.many)
	return []row{
		{section: sec, name: "start → all answered CMD_INIT", unit: "ms", s: t},
		{section: sec, name: "total RSS", unit: "MiB", s: rss},
		{section: sec, name: "total PSS", unit: "MiB", s: pss},
	}, nil
}
