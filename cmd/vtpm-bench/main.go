// Command vtpm-bench runs vtpm and swtpm side by side on the same machine
// and libtpms, with identical "swtpm socket" options and interleaved
// iterations, and writes the results (with ratios vtpm/swtpm and targets)
// to BENCHMARKS.md. "make bench" builds vtpm and runs it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "vtpm-bench:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		vtpmPath  = flag.String("vtpm", "bin/vtpm", "the vtpm binary (run as: vtpm swtpm socket …)")
		swtpmPath = flag.String("swtpm", "swtpm", "the swtpm binary (run as: swtpm socket …)")
		out       = flag.String("out", "BENCHMARKS.md", "report to rewrite (- for standard output)")
		dir       = flag.String("dir", os.TempDir(), "where to create state directories (its file system decides what fsync costs)")
		ksPath    = flag.String("keyservice", "", "the vtpm-keyservice binary, for measurement 13 (default: beside -vtpm)")
		setupPath = flag.String("swtpm-setup", "swtpm_setup", "swtpm's swtpm_setup, for measurement 7 (skipped if not found)")
		only      = flag.String("only", "1,2,3,4,5,6,7,8,9,11,12,13", "measurements to run (comma-separated numbers)")
		cfg       config
	)
	flag.IntVar(&cfg.rtt, "rtt", 5000, "GetRandom and PCR_Extend round trips per implementation")
	flag.IntVar(&cfg.nv, "nv", 500, "NV_Write iterations per implementation")
	flag.IntVar(&cfg.ecc, "ecc", 200, "ECC P-256 CreatePrimary iterations per implementation")
	flag.IntVar(&cfg.rsa, "rsa", 50, "RSA-2048 CreatePrimary iterations per implementation")
	flag.IntVar(&cfg.warmup, "warmup", 10, "unrecorded iterations before each data-channel series")
	flag.IntVar(&cfg.starts, "starts", 60, "process starts per implementation, for each of fresh and existing state")
	flag.IntVar(&cfg.mem, "mem", 6, "idle instances measured per implementation")
	flag.IntVar(&cfg.many, "many", 100, "instances started at once")
	flag.IntVar(&cfg.manyRounds, "many-rounds", 3, "rounds of -many instances per implementation")
	flag.DurationVar(&cfg.poll, "poll", 200*time.Microsecond, "interval between connection attempts to a starting TPM's control socket (×10 with -many)")
	flag.IntVar(&cfg.setups, "setups", 20, "full manufactures (swtpm_setup) per implementation")
	flag.IntVar(&cfg.keyOps, "key-ops", 200, "in-process key operations (open a TPM, grant) of each kind")
	flag.IntVar(&cfg.cliGrants, "cli-grants", 30, "`vtpm protector grant` runs")
	flag.IntVar(&cfg.rewraps, "rewraps", 3, "rounds of re-wrapping -rewrap-n protectors")
	flag.IntVar(&cfg.rewrapN, "rewrap-n", 1000, "protectors re-wrapped per round")
	flag.IntVar(&cfg.keyStarts, "key-starts", 40, "vtpm starts with a key protector and with --data-key, each")
	flag.IntVar(&cfg.migrations, "migrations", 3, "live migrations of a QEMU guest per implementation and without a TPM (0 skips measurement 9; skipped too when QEMU cannot run guests)")
	flag.IntVar(&cfg.hostMigrations, "host-migrations", 2, "live migrations between two data roots (vm migrate), with a vTPM and without a TPM each (0 skips measurement 12)")
	flag.IntVar(&cfg.moves, "moves", 5, "offline moves of a stopped VM, and as many cp -r of its bundle (0 skips measurement 11)")
	flag.IntVar(&cfg.moveMiB, "move-mib", 256, "MiB of the moved VM's disk")
	flag.IntVar(&cfg.ksReleases, "ks-releases", 200, "key releases per series: 1 and -ks-hosts hosts, on 1 and 3 nodes (0 skips measurement 13)")
	flag.IntVar(&cfg.ksHosts, "ks-hosts", 10, "hosts releasing keys at once")
	flag.IntVar(&cfg.ksKills, "ks-kills", 1, "kill -9 recoveries of a 3-node key service, each on a fresh cluster")
	flag.DurationVar(&cfg.settle, "settle", 2*time.Second, "idle time before reading an instance's memory use (vtpm gives back its code's pages after 1 s without a command)")
	flag.Parse()
	if flag.NArg() != 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	which := map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		which[strings.TrimSpace(s)] = true
	}

	sw, err := exec.LookPath(*swtpmPath)
	if err != nil {
		return fmt.Errorf("swtpm: %w", err)
	}
	vt, err := filepath.Abs(*vtpmPath)
	if err != nil {
		return fmt.Errorf("vtpm: %w", err)
	}
	if _, err := os.Stat(vt); err != nil {
		return fmt.Errorf("vtpm binary: %w (build it with `go build -o bin/vtpm ./cmd/vtpm`)", err)
	}
	base, err := os.MkdirTemp(*dir, "vtpm-bench-")
	if err != nil {
		return fmt.Errorf("create work directory: %w", err)
	}
	defer os.RemoveAll(base)
	setup, err := exec.LookPath(*setupPath)
	if err != nil {
		setup = "" // measurement 7 says it was skipped
	}
	ksShown := *ksPath
	if ksShown == "" {
		ksShown = filepath.Join(filepath.Dir(*vtpmPath), "vtpm-keyservice")
	}
	ks, err := filepath.Abs(ksShown)
	if err != nil {
		return fmt.Errorf("vtpm-keyservice: %w", err)
	}
	env := []string{"VTPM_HOME=" + filepath.Join(base, "vtpm-home")}
	b := &bench{
		impls: [2]*impl{
			{name: "swtpm", argv: []string{sw, "socket"}, env: env},
			{name: "vtpm", argv: []string{vt, "swtpm", "socket"}, env: env},
		},
		swtpmSetup:    setup,
		keyserviceBin: ks, keyserviceShown: ksShown,
		base: base,
		cfg:  cfg,
		log:  os.Stderr,
	}

	start := time.Now()
	env0 := describeEnv(b, *dir)
	env0.vtpmPath = *vtpmPath // as given: the report names no local directories
	b.progress("manufacturing the shared permanent state with swtpm")
	if b.golden, err = makeGolden(b.impls[0], base); err != nil {
		return fmt.Errorf("make the shared state: %w", err)
	}
	var rows []row
	for _, m := range []struct {
		id  string
		run func() ([]row, error)
	}{
		{"1", b.latency}, {"2", b.nvWrites}, {"3", b.createPrimaries},
		{"4", b.startup}, {"5", b.memory}, {"6", b.many},
		{"7", b.setup}, {"8", b.keyManagement}, {"9", b.migrationDowntime},
		{"11", b.offlineMove}, {"12", b.hostMigrations}, {"13", b.keyService},
	} {
		if !which[m.id] {
			continue
		}
		r, err := m.run()
		if err != nil {
			return fmt.Errorf("measurement %s: %w", m.id, err)
		}
		rows = append(rows, r...)
	}
	for i := range rows {
		rows[i].judge()
	}
	env0.took = time.Since(start)
	env0.loadEnd = loadAvg()

	rep := report{env: env0, cfg: cfg, rows: rows, command: commandLine()}
	if *out == "-" {
		_, err := os.Stdout.WriteString(rep.markdown(""))
		return err
	}
	old, err := os.ReadFile(*out)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("read %s: %w", *out, err)
	}
	md := rep.markdown(keptNotes(string(old)))
	if err := os.WriteFile(*out, []byte(md), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	fmt.Print(rep.tables())
	b.progress("wrote %s in %v", *out, env0.took.Round(time.Second))
	return nil
}

// commandLine is how this report was made, as one could type it again.
func commandLine() string {
	args := slices.Clone(os.Args)
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\"'$\\*?;&|<>()") {
			args[i] = strconv.Quote(a)
		}
	}
	cmd := "`" + strings.Join(args, " ") + "`"
	if os.Getenv("MAKELEVEL") != "" {
		return "`make bench`, which ran " + cmd
	}
	return cmd
}

// commandOutput runs a command briefly and returns its output.
func commandOutput(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	return string(out), nil
}

// output is the first line of a command's output, or "" if it failed.
func output(name string, args ...string) string {
	out, err := commandOutput(name, args...)
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	return line
}
