package main

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"
)

// environment describes the machine and the software measured.
type environment struct {
	date                  time.Time
	cpu, os, kernel, mem  string
	cores                 int
	fs                    string
	swtpm, vtpm, libtpms  string
	goVersion, goTPM, git string
	loadStart, loadEnd    string
	swtpmPath, vtpmPath   string
	swtpmSetup            string // path and version; "" if not found
	took                  time.Duration
}

func describeEnv(b *bench, dir string) *environment {
	e := &environment{
		date:      time.Now().UTC(),
		cpu:       cpuModel(),
		cores:     runtime.NumCPU(),
		kernel:    firstLine("/proc/sys/kernel/osrelease"),
		os:        osRelease(),
		mem:       memTotal(),
		fs:        fsType(dir),
		swtpmPath: b.impls[0].argv[0],
		vtpmPath:  b.impls[1].argv[0],
		goVersion: runtime.Version(),
		loadStart: loadAvg(),
	}
	e.swtpm = output(e.swtpmPath, "--version")
	e.vtpm = output(e.vtpmPath, "--version")
	e.libtpms = libtpmsVersion(e.swtpmPath, e.vtpmPath)
	if b.swtpmSetup != "" {
		e.swtpmSetup = fmt.Sprintf("%s — `%s`", orUnknown(versionLine(b.swtpmSetup)), b.swtpmSetup)
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/google/go-tpm" {
				e.goTPM = d.Version
			}
		}
	}
	if rev := output("git", "rev-parse", "--short", "HEAD"); rev != "" {
		e.git = rev
		if output("git", "status", "--porcelain", "--untracked-files=no") != "" {
			e.git += " with uncommitted changes"
		}
	}
	return e
}

// versionLine is the first line bin --version prints, whatever its exit
// status (swtpm_setup 0.7.1 exits with 1).
func versionLine(bin string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, bin, "--version").CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

func firstLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "unknown"
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return line
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func osRelease() string {
	b, err := os.ReadFile("/etc/os-release")
	if err != nil {
		return "unknown"
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "PRETTY_NAME="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return "unknown"
}

func memTotal() string {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return "unknown"
	}
	var kb float64
	for line := range strings.Lines(string(b)) {
		if _, err := fmt.Sscanf(line, "MemTotal: %g kB", &kb); err == nil {
			return fmt.Sprintf("%.1f GiB", kb/(1<<20))
		}
	}
	return "unknown"
}

func loadAvg() string {
	f := strings.Fields(firstLine("/proc/loadavg"))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// fsType names the file system holding dir, which decides what fsync costs.
func fsType(dir string) string {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return "unknown"
	}
	names := map[int64]string{
		0xEF53: "ext4", 0x01021994: "tmpfs", 0x58465342: "xfs", 0x9123683E: "btrfs",
		0x794C7630: "overlayfs", 0x2FC12FC1: "zfs", 0x6969: "nfs",
	}
	name, ok := names[int64(st.Type)]
	if !ok {
		name = fmt.Sprintf("file system type 0x%x", st.Type)
	}
	return fmt.Sprintf("%s (%s)", dir, name)
}

// libtpmsVersion reports the installed libtpms and which library file each
// binary loads, which must be the same one.
func libtpmsVersion(bins ...string) string {
	v := output("dpkg-query", "-W", "-f", "${Version}", "libtpms0")
	if v == "" {
		v = output("pkg-config", "--modversion", "libtpms")
	}
	var libs []string
	for _, bin := range bins {
		lib := "not linked dynamically"
		out, _ := commandOutput("ldd", bin)
		for line := range strings.Lines(out) {
			if name, rest, ok := strings.Cut(strings.TrimSpace(line), " => "); ok && strings.HasPrefix(name, "libtpms.so") {
				path, _, _ := strings.Cut(rest, " (")
				if real, err := filepath.EvalSymlinks(path); err == nil {
					path = real
				}
				lib = path
			}
		}
		libs = append(libs, fmt.Sprintf("%s loads %s", filepath.Base(bin), lib))
	}
	return fmt.Sprintf("%s; %s", v, strings.Join(libs, ", "))
}

// report renders the results.
type report struct {
	env     *environment
	cfg     config
	rows    []row
	command string
}

const (
	notesBegin = "<!-- notes: written by hand, kept by vtpm-bench across runs -->"
	notesEnd   = "<!-- end of notes -->"
)

// keptNotes returns the hand-written notes section of an earlier report.
func keptNotes(old string) string {
	_, rest, ok := strings.Cut(old, notesBegin)
	if !ok {
		return ""
	}
	notes, _, ok := strings.Cut(rest, notesEnd)
	if !ok {
		return ""
	}
	return strings.TrimSpace(notes)
}

func num(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "–"
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// judge summarises the samples and compares the ratio of medians with the
// row's target.
func (r *row) judge() {
	r.sum = [2]summary{summarize(r.s[0]), summarize(r.s[1])}
	switch {
	case r.skip != "":
		r.result = "skipped"
		return
	case r.table != "":
		r.result = "report only"
		return
	case r.vtpmOnly:
		r.ratio, r.lo, r.hi = math.NaN(), math.NaN(), math.NaN()
		if r.limit == 0 {
			r.result = "report only"
			return
		}
		r.pass = r.sum[1].Median <= r.limit
		r.result = "**FAIL**"
		if r.pass {
			r.result = "pass"
		}
		return
	}
	r.ratio = r.sum[1].Median / r.sum[0].Median
	r.lo, r.hi = ratioCI(r.s[0], r.s[1], 1000)
	if r.target == 0 {
		r.result = "report only"
		return
	}
	r.pass = r.ratio <= r.target
	r.result = "**FAIL**"
	if r.pass {
		r.result = "pass"
	}
	if !math.IsNaN(r.lo) && r.lo <= r.target && r.target <= r.hi {
		r.result += " (within noise)"
	}
}

func targetText(t float64) string {
	switch t {
	case 0:
		return "—"
	case 1:
		return "≤ swtpm"
	}
	if inv := math.Round(1 / t); t < 1 && math.Abs(1/t-inv) < 1e-9 {
		return fmt.Sprintf("≤ 1/%g of swtpm", inv)
	}
	return fmt.Sprintf("≤ %g× swtpm", t)
}

// tables renders the results tables, one per section.
func (r *report) tables() string {
	var sb strings.Builder
	section := ""
	for _, x := range r.rows {
		if x.section != section {
			section = x.section
			fmt.Fprintf(&sb, "\n### %s\n\n", section)
			switch {
			case x.skip != "", x.table != "":
			case x.vtpmOnly:
				sb.WriteString("| measurement | unit | n | vtpm median | vtpm p95 | swtpm | target | result |\n")
				sb.WriteString("|---|---|--:|--:|--:|---|---|---|\n")
			default:
				sb.WriteString("| measurement | unit | n | swtpm median | swtpm p95 | vtpm median | vtpm p95 | vtpm/swtpm (95% CI) | target | result |\n")
				sb.WriteString("|---|---|--:|--:|--:|--:|--:|--:|---|---|\n")
			}
		}
		a, b := x.sum[0], x.sum[1]
		switch {
		case x.skip != "":
			fmt.Fprintf(&sb, "Skipped: %s.\n", x.skip)
			continue
		case x.table != "":
			sb.WriteString(x.table)
			continue
		case x.vtpmOnly:
			target := "—"
			if x.limit != 0 {
				target = fmt.Sprintf("median ≤ %g %s", x.limit, x.unit)
			}
			fmt.Fprintf(&sb, "| %s | %s | %d | %s | %s | no equivalent | %s | %s |\n",
				x.name, x.unit, b.N, num(b.Median), num(b.P95), target, x.result)
			continue
		}
		ci := ""
		if !math.IsNaN(x.lo) {
			ci = fmt.Sprintf(" (%s–%s)", num(x.lo), num(x.hi))
		}
		fmt.Fprintf(&sb, "| %s | %s | %d | %s | %s | %s | %s | **%s**%s | %s | %s |\n",
			x.name, x.unit, a.N, num(a.Median), num(a.P95), num(b.Median), num(b.P95),
			num(x.ratio), ci, targetText(x.target), x.result)
	}
	var notes []string
	for _, x := range r.rows {
		if x.note != "" {
			notes = append(notes, fmt.Sprintf("- %s: %s.", x.name, x.note))
		}
	}
	if len(notes) > 0 {
		sb.WriteString("\n" + strings.Join(notes, "\n") + "\n")
	}
	return sb.String()
}

func (r *report) summaryLine() string {
	met, total := 0, 0
	var failed []string
	for _, x := range r.rows {
		if x.skip != "" || (x.target == 0 && x.limit == 0) {
			continue
		}
		total++
		if x.pass {
			met++
		} else {
			failed = append(failed, x.name)
		}
	}
	s := fmt.Sprintf("%d of %d targets met.", met, total)
	if len(failed) > 0 {
		s += " Missed: " + strings.Join(failed, "; ") + "."
	}
	return s
}

func (r *report) markdown(notes string) string {
	e, c := r.env, r.cfg
	var sb strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&sb, format, args...) }
	w("# Benchmarks: vtpm against swtpm\n\n")
	w("This file is written by `cmd/vtpm-bench`; rerun `make bench` to refresh it (about four minutes).\n")
	w("Only the notes section at the end is written by hand; it is kept across runs.\n\n")
	w("- Date: %s\n", e.date.Format("2006-01-02 15:04 UTC"))
	w("- Command: %s\n", r.command)
	w("- Run time: %v; load average %s before, %s after\n\n", e.took.Round(time.Second), e.loadStart, e.loadEnd)
	w("**%s**\n\n", r.summaryLine())

	w("## Machine\n\n")
	w("- CPU: %s, %d cores\n", e.cpu, e.cores)
	w("- Memory: %s\n", e.mem)
	w("- Kernel: Linux %s (%s)\n", e.kernel, e.os)
	w("- State directories: %s\n\n", e.fs)

	w("## Versions\n\n")
	w("- swtpm: %s — `%s`\n", e.swtpm, e.swtpmPath)
	w("- vtpm: %s, commit %s — `%s`\n", e.vtpm, orUnknown(e.git), e.vtpmPath)
	if e.swtpmSetup != "" {
		w("- swtpm_setup: %s\n", e.swtpmSetup)
	}
	w("- libtpms: %s\n", e.libtpms)
	w("- Client: %s, github.com/google/go-tpm %s\n\n", e.goVersion, orUnknown(e.goTPM))

	w("## Method\n\n")
	w("Both implementations run on the same machine at the same time, with the same options\n")
	w("(`--tpm2 --tpmstate dir=… --ctrl type=unixio,path=…`, plus `--server type=tcp,port=…,bindaddr=127.0.0.1`\n")
	w("where a data channel is used); swtpm as `swtpm socket …`, vtpm as `vtpm swtpm socket …`.\n")
	w("Iterations alternate between the two, and which goes first alternates too, so that drift in\n")
	w("machine load hits both alike.\n\n")
	w("- Sections 1–3 and 5 load one permanent state, manufactured once by swtpm, into both TPMs\n")
	w("  (CMD_SET_STATEBLOB before CMD_INIT, then TPM2_Startup(CLEAR)): both hold the same seeds, so a\n")
	w("  CreatePrimary derives the same key with the same work in both (checked: the public keys match).\n")
	w("  The template's unique field changes with each iteration (the same sequence for both).\n")
	w("- Sections 1–3 time one command on the raw data channel (TCP on loopback; no TCTI, no simulator\n")
	w("  prefix) from writing the request to having read the whole response; the client's own work is\n")
	w("  outside that window. go-tpm's `tpm2` package builds the commands: in section 1 once, then the\n")
	w("  same bytes are replayed (a password session has no nonces) and each response code is checked,\n")
	w("  so that the client's marshalling garbage does not disturb the loop; in sections 2–3 for every\n")
	w("  call. %d unrecorded warm-up iterations precede each series.\n", c.warmup)
	w("- Section 4 spawns the process, polls the control socket every %v until it connects,\n", c.poll)
	w("  sends CMD_GET_CAPABILITY and then CMD_INIT, as QEMU does first; the process is then stopped with\n")
	w("  CMD_SHUTDOWN (not timed). \"Existing state\" is a state directory left by INIT,\n")
	w("  TPM2_Startup(CLEAR) and TPM2_Shutdown(CLEAR), written by the same implementation.\n")
	w("- Section 5 runs one instance at a time (so that no page is shared with the other\n")
	w("  implementation), waits %v after TPM2_Startup and reads `/proc/PID/smaps_rollup`. An idle vtpm\n", c.settle)
	w("  gives back the pages of its code after 1 s without a command (they stay in the page cache).\n")
	w("  File-backed PSS and USS depend on which other processes map the same libraries (libc,\n")
	w("  libcrypto, libtpms) at that moment, so on a shared machine they move from run to run;\n")
	w("  anonymous PSS does not.\n")
	w("- Section 6 starts %d processes concurrently, each with its own fresh state directory and control\n", c.many)
	w("  socket and no data channel (as QEMU runs them), polling every %v; time runs from the first\n", c.poll*10)
	w("  spawn until the last CMD_INIT has been answered. The totals are summed over all %d processes.\n", c.many)
	w("- Section 7 runs a full manufacture, `swtpm_setup %s --tpm-state DIR`, with swtpm's\n", strings.Join(setupArgs, " "))
	w("  swtpm_setup (which finds swtpm in PATH; its certificates come from swtpm_localca's configuration) and as\n")
	w("  `vtpm swtpm_setup …` (VTPM_HOME a temporary directory, VTPM_HOST_TPM=none: a file-protected keystore),\n")
	w("  each on a fresh state directory, timed from spawn to exit. One unrecorded pair runs first (vtpm\n")
	w("  creates its keystore then). CPU time is the process's and its waited-for children's (wait4 rusage).\n")
	w("- Section 8 is vtpm's alone (swtpm has no key protectors); its target is absolute: opening a TPM's key\n")
	w("  adds under %g ms to instance start. All of it uses one file-protected keystore (VTPM_HOST_TPM=none).\n", openLimit)
	w("  \"Open a TPM\" calls, in this process, what a vTPM does before libtpms starts: `keybroker.Open`,\n")
	w("  `Broker.OpenTPM` and `seal.Open` + `Load` of a %d KiB permanent state; the parts are timed\n", permallSize>>10)
	w("  separately too, interleaved round by round. Each grant works on a TPM of its own, made before the\n")
	w("  run (not timed). Re-wrapping works on %d protectors marshalled in memory (%d round(s) after one\n", c.rewrapN, c.rewraps)
	w("  warm-up). The last rows start `vtpm swtpm socket` on an existing state whose key comes from its\n")
	w("  protector or from `--data-key file=…`, alternating, as in section 4; the difference is taken pair by pair.\n")
	w("- Section 9 boots the same small guest (256 MiB, qemutest's image) %d time(s) without a TPM and on each\n", c.migrations)
	w("  implementation's TPM, interleaved, and migrates it over a unix socket to a new QEMU whose TPM starts on an\n")
	w("  empty state directory (vtpm without `--migration-key`: the destination adopts the TPM from the stream);\n")
	w("  the figure is QEMU's own `downtime` from query-migrate. It is skipped when QEMU cannot run guests.\n")
	w("- Section 11 moves a stopped VM (manufactured TPM, %d MiB disk of random data) %d time(s) back and forth\n", c.moveMiB, c.moves)
	w("  between two data roots in this process through the transfer stream, interleaved with `cp -r` of the\n")
	w("  same bundle followed by `sync` of the copied files; throughput is the bundle's bytes over the time taken.\n")
	w("- Section 13 starts `vtpm-keyservice serve` processes (1 node, then 3, on loopback ports, a fresh service each),\n")
	w("  inits them with `vtpm-keyservice init` and adds hosts in key mode through the admin API; %d releases per\n", c.ksReleases)
	w("  series from 1 host and from %d at once, timed in the client; the local open is interleaved with releases;\n", c.ksHosts)
	w("  recovery is timed from `kill -9` of the node every host tries first (the etcd leader) to a release begun after it.\n")
	w("- Medians; p95 is nearest-rank (the maximum when n ≤ 20). The ratio is median(vtpm)/median(swtpm),\n")
	w("  with a 95%% percentile-bootstrap interval; \"within noise\" means that interval contains the target.\n")
	w("- The machine was shared with other work while this ran (see the load averages): absolute figures\n")
	w("  are noisy, the interleaved ratios less so.\n")

	w("\n## Results\n")
	sb.WriteString(r.tables())

	w("\n## Notes\n\n%s\n", notesBegin)
	if notes == "" {
		notes = "(No notes yet.)"
	}
	w("%s\n%s\n", notes, notesEnd)
	return sb.String()
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}
