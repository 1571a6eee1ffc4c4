package main

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/seal"
)

const (
	keySection = "8. Key management (vtpm only: swtpm has no key protectors)"
	// openLimit is the target: opening a TPM's key adds under 5 ms to
	// instance start.
	openLimit = 5.0
	// permallSize is about the size of libtpms' permanent state after a
	// guest has used its TPM (a fresh one is about 1.3 KiB).
	permallSize = 4 << 10
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// keys holds what measurement 8 works on: one host keystore, as
// VTPM_HOME, shared by the in-process calls and the vtpm processes.
type keys struct {
	b     *bench
	root  string
	opts  keystore.Options
	owner *guardian.Guardian // the host's own guardian
	other *guardian.Guardian // the guardian granted, public part only
}

// keyManagement is measurement 8.
func (b *bench) keyManagement() ([]row, error) {
	k := &keys{b: b, root: filepath.Join(b.base, "keys-home"), opts: keystore.Options{HostTPM: "none", Logger: quiet()}}
	h, err := keybroker.Open(k.root, k.opts)
	if err != nil {
		return nil, err
	}
	k.owner, err = h.Local()
	h.Close()
	if err != nil {
		return nil, err
	}
	g, err := guardian.New("host:other", guardian.MLKEM768X25519)
	if err != nil {
		return nil, err
	}
	k.other = g.Public()

	var rows []row
	for _, m := range []func() ([]row, error){k.open, k.grant, k.rewrap, k.starts} {
		r, err := m()
		if err != nil {
			return nil, err
		}
		rows = append(rows, r...)
	}
	return rows, nil
}

// env is the environment of a vtpm process using this keystore.
func (k *keys) env() []string {
	return []string{"VTPM_HOME=" + k.root, "VTPM_HOST_TPM=none"}
}

// newTPM creates a TPM under a protector owned by this host in a fresh
// directory, with a sealed permanent state of permallSize bytes.
func (k *keys) newTPM(name string) (string, error) {
	h, err := keybroker.Open(k.root, k.opts)
	if err != nil {
		return "", err
	}
	defer h.Close()
	dir := filepath.Join(k.b.base, name)
	o, err := h.OpenTPM(dir)
	if err != nil {
		return "", err
	}
	defer o.Close()
	s, err := o.Key.OpenStore(dir, seal.Options{Generations: h.Generations(), Logger: quiet()})
	if err != nil {
		return "", err
	}
	blob := make([]byte, permallSize)
	rand.Read(blob)
	return dir, errors.Join(s.Store("permall", blob), s.Close())
}

// loadState opens dir's sealed state with key and decrypts permall, as a
// vTPM does before libtpms starts.
func loadState(dir string, key *keybroker.Key, gens seal.Generations) error {
	s, err := key.OpenStore(dir, seal.Options{Generations: gens, Logger: quiet()})
	if err != nil {
		return err
	}
	_, err = s.Load("permall")
	return errors.Join(err, s.Close())
}

// timed is one kind of operation, timed in milliseconds.
type timed struct {
	op     func() error
	before func() error // untimed preparation, if any
	s      []float64
}

// interleaveOps runs each op n times, round by round, after warm-up rounds
// that are not recorded.
func (b *bench) interleaveOps(n int, ops ...*timed) error {
	for i := -b.cfg.warmup; i < n; i++ {
		for _, t := range ops {
			if t.before != nil {
				if err := t.before(); err != nil {
					return err
				}
			}
			t0 := time.Now()
			if err := t.op(); err != nil {
				return err
			}
			if d := time.Since(t0); i >= 0 {
				t.s = append(t.s, scaled(d, time.Millisecond))
			}
		}
	}
	return nil
}

func vtpmRow(name, unit string, s []float64, limit float64, note string) row {
	return row{section: keySection, name: name, unit: unit, s: [2][]float64{nil, s}, vtpmOnly: true, limit: limit, note: note}
}

// open times what a vTPM process does with keys before libtpms starts,
// in-process, as a whole and part by part.
func (k *keys) open() ([]row, error) {
	dir, err := k.newTPM("keys-open")
	if err != nil {
		return nil, err
	}
	h, err := keybroker.Open(k.root, k.opts)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	o, err := h.OpenTPM(dir)
	if err != nil {
		return nil, err
	}
	whole := &timed{op: func() error {
		h, err := keybroker.Open(k.root, k.opts)
		if err != nil {
			return err
		}
		defer h.Close()
		o, err := h.OpenTPM(dir)
		if err != nil {
			return err
		}
		defer o.Close()
		return loadState(dir, o.Key, h.Generations())
	}}
	ks := &timed{op: func() error {
		h, err := keybroker.Open(k.root, k.opts)
		if err != nil {
			return err
		}
		return h.Close()
	}}
	defer o.Close()
	prot := &timed{op: func() error {
		o, err := h.OpenTPM(dir)
		o.Close()
		return err
	}}
	state := &timed{op: func() error { return loadState(dir, o.Key, h.Generations()) }}
	k.b.progress("open a TPM in process: %d × 4", k.b.cfg.keyOps)
	if err := k.b.interleaveOps(k.b.cfg.keyOps, whole, ks, prot, state); err != nil {
		return nil, fmt.Errorf("open a TPM: %w", err)
	}
	return []row{
		vtpmRow("open a TPM in process: keystore + protector + sealed state", "ms", whole.s, openLimit,
			"keybroker.Open (file-protected master key), Host.OpenTPM (read the protector, verify its certificates and the owner's signature, HPKE-unwrap the data key), seal.Open + Load of a 4 KiB permall with generation check"),
		vtpmRow("… of which: open the host keystore", "ms", ks.s, 0, ""),
		vtpmRow("… of which: open the protector (verify + unwrap)", "ms", prot.s, 0, ""),
		vtpmRow("… of which: open and decrypt the sealed state", "ms", state.s, 0, ""),
	}, nil
}

// grant times granting a guardian on one TPM, in process and with
// `vtpm protector grant`. Each run grants on a TPM of its own, made before
// it (not timed): a protector cannot be put back once a newer version of it
// was seen.
func (k *keys) grant() ([]row, error) {
	var dir string
	n := 0
	restore := func() (err error) {
		n++
		dir, err = k.newTPM(fmt.Sprintf("keys-grant-%d", n))
		return err
	}
	certs, err := k.other.ExportCertificates()
	if err != nil {
		return nil, err
	}
	certsPath := filepath.Join(k.b.base, "other.pem")
	if err := os.WriteFile(certsPath, certs, 0o644); err != nil {
		return nil, err
	}

	h, err := keybroker.Open(k.root, k.opts)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	// As `vtpm protector grant` does, with the keystore already open.
	inProc := &timed{before: restore, op: func() error {
		p, err := keybroker.ReadProtector(dir)
		if err != nil {
			return err
		}
		owner, err := h.Find(p.Owner().Fingerprint())
		if err != nil {
			return err
		}
		o, err := h.OpenTPM(dir)
		if err != nil {
			return err
		}
		defer o.Close()
		if err := o.Key.Grant(p, k.other, owner); err != nil {
			return err
		}
		return keybroker.WriteProtector(dir, p)
	}}
	k.b.progress("grant a guardian in process: %d", k.b.cfg.keyOps)
	if err := k.b.interleaveOps(k.b.cfg.keyOps, inProc); err != nil {
		return nil, fmt.Errorf("grant: %w", err)
	}

	vt := k.b.impls[1].argv[0]
	cli := &timed{before: restore, op: func() error {
		c := exec.Command(vt, "protector", "grant", dir, certsPath)
		c.Env = append(os.Environ(), k.env()...)
		if out, err := c.CombinedOutput(); err != nil {
			return fmt.Errorf("vtpm protector grant: %w: %s", err, out)
		}
		return nil
	}}
	k.b.progress("vtpm protector grant: %d", k.b.cfg.cliGrants)
	if err := k.b.interleaveOps(k.b.cfg.cliGrants, cli); err != nil {
		return nil, err
	}
	return []row{
		vtpmRow("grant a guardian on one TPM, in process", "ms", inProc.s, 0,
			"read and verify the protector, open it with the owner, HPKE-wrap the data key to the new guardian (ML-KEM-768 + X25519), re-sign, write it crash-safely (fsync of file and directory)"),
		vtpmRow("grant a guardian on one TPM, `vtpm protector grant` end to end", "ms", cli.s, 0,
			"the same, plus starting the process, opening the keystore and parsing the certificates"),
	}, nil
}

// rewrap times re-wrapping protectors to a new guardian in memory, as when
// every TPM of a host gets a row for a fleet's guardian: for each, parse and
// verify, open with the owner, grant, re-sign and marshal.
func (k *keys) rewrap() ([]row, error) {
	h, err := keybroker.Open(k.root, k.opts)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	owner, err := h.Local()
	if err != nil {
		return nil, err
	}
	n := k.b.cfg.rewrapN
	k.b.progress("re-wrap %d protectors: %d rounds", n, k.b.cfg.rewraps)
	orig := make([][]byte, n)
	for i := range orig {
		p, err := keybroker.NewProtector(uuid.New(), owner)
		if err != nil {
			return nil, err
		}
		orig[i] = p.Marshal()
	}
	owners := []*guardian.Guardian{owner}
	t := &timed{op: func() error {
		for _, b := range orig {
			p, err := guardian.ParseProtector(b)
			if err != nil {
				return err
			}
			if err := keybroker.GrantProtector(p, owners, k.other, owner); err != nil {
				return err
			}
			_ = p.Marshal()
		}
		return nil
	}}
	warmup := k.b.cfg.warmup
	k.b.cfg.warmup = 1
	err = k.b.interleaveOps(k.b.cfg.rewraps, t)
	k.b.cfg.warmup = warmup
	if err != nil {
		return nil, fmt.Errorf("re-wrap: %w", err)
	}
	per := summarize(t.s).Median * 1000 / float64(n)
	return []row{vtpmRow(fmt.Sprintf("re-wrap %d protectors to a new guardian, in memory", n), "ms", t.s, 0,
		fmt.Sprintf("parse and verify, open with the owner, grant, re-sign, marshal; %.0f µs per protector", per))}, nil
}

// starts times `vtpm swtpm socket` from start to CMD_INIT answered on an
// existing state, its key opened through the protector or given with
// --data-key, interleaved.
func (k *keys) starts() ([]row, error) {
	im := &impl{name: "vtpm", argv: k.b.impls[1].argv, env: k.env()}
	keyFile := filepath.Join(k.b.base, "data.key")
	if err := keybroker.NewDataKeyFile(keyFile); err != nil {
		return nil, err
	}
	var opts [2]procOpts // 0: protector, 1: --data-key
	for i := range opts {
		o, err := newInstanceDir(k.b.base)
		if err != nil {
			return nil, err
		}
		defer removeInstanceDir(o)
		if i == 1 {
			o.extra = []string{"--data-key", "file=" + keyFile}
		}
		// The first start manufactures the TPM and stores its state.
		if _, _, err := k.b.startOnce(im, o); err != nil {
			return nil, err
		}
		opts[i] = o
	}
	if _, err := os.Stat(filepath.Join(opts[0].stateDir, keybroker.ProtectorFile)); err != nil {
		return nil, fmt.Errorf("the TPM started without --data-key has no protector: %w", err)
	}
	k.b.progress("vtpm start with a protector and with --data-key: %d × 2", k.b.cfg.keyStarts)
	var s [2][]float64
	for i := range k.b.cfg.keyStarts {
		for _, j := range order(i) {
			_, d, err := k.b.startOnce(im, opts[j])
			if err != nil {
				return nil, err
			}
			s[j] = append(s[j], scaled(d, time.Millisecond))
		}
	}
	diff := make([]float64, len(s[0]))
	for i := range diff {
		diff[i] = s[0][i] - s[1][i]
	}
	const what = "`vtpm swtpm socket` start → GET_CAPABILITY + INIT answered, existing state"
	return []row{
		vtpmRow(what+", key protector", "ms", s[0], 0, ""),
		vtpmRow(what+", `--data-key`", "ms", s[1], 0, ""),
		vtpmRow("what the protector adds to start (paired difference of the two above)", "ms", diff, openLimit,
			"both open the keystore (generation records); only the protector start reads, verifies and unwraps the protector"),
	}, nil
}
