package instance_test

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vtpm/internal/instance"
	"vtpm/internal/testutil"
)

// codeRss sums, by file name, the resident size of pid's executable
// mappings (smaps "r-xp").
func codeRss(t *testing.T, pid int) map[string]int64 {
	t.Helper()
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "smaps"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rss := map[string]int64{}
	name := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		switch {
		case len(fl) >= 5 && strings.Contains(fl[0], "-") && !strings.HasSuffix(fl[0], ":"):
			name = ""
			if len(fl) >= 6 && fl[1] == "r-xp" {
				name = filepath.Base(fl[5])
			}
		case name != "" && fl[0] == "Rss:":
			n, _ := strconv.ParseInt(fl[1], 10, 64)
			rss[name] += n << 10
		}
	}
	return rss
}

// libtpmsRss is the resident code of libtpms in rss.
func libtpmsRss(rss map[string]int64) (int64, bool) {
	for name, n := range rss {
		if strings.HasPrefix(name, "libtpms.so") {
			return n, true
		}
	}
	return 0, false
}

// An idle instance gives back its code's pages (memtrim) and serves the
// next command as before.
func TestIdleInstanceGivesBackCode(t *testing.T) {
	t.Parallel()
	needTools(t)
	testutil.Need(t, "tpm2_startup", "tpm2_getrandom")
	p := startTPM(t, ourVtpm, tpmConfig{transport: tcpBoth})
	p.mustIoctl(t, "-i")
	p.tpm2(t, "tpm2_startup", "-c")
	if r := p.tpm2(t, "tpm2_getrandom", "--hex", "8"); len(r) != 16 {
		t.Fatalf("tpm2_getrandom --hex 8: %q", r)
	}
	pid := p.Cmd.Process.Pid
	busy := codeRss(t, pid)
	if n, ok := libtpmsRss(busy); !ok || n == 0 {
		t.Fatalf("libtpms' code is not mapped after a command: %v", busy)
	}
	// Idle: no command for instance.IdleAfter; the trim runs in the check after.
	deadline := time.Now().Add(3*instance.IdleAfter + 5*time.Second)
	for {
		if n, _ := libtpmsRss(codeRss(t, pid)); n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("libtpms' code is still mapped after %v without a command: %v", 3*instance.IdleAfter+5*time.Second, codeRss(t, pid))
		}
		time.Sleep(100 * time.Millisecond)
	}
	idle := codeRss(t, pid)
	exe := filepath.Base(testutil.Binary(t))
	if idle[exe] >= busy[exe] {
		t.Errorf("the executable's code: %d bytes resident when idle, %d when busy; want fewer", idle[exe], busy[exe])
	}
	// The next commands run as before, and bring back what they run.
	if r := p.tpm2(t, "tpm2_getrandom", "--hex", "8"); len(r) != 16 {
		t.Errorf("tpm2_getrandom after an idle spell: %q", r)
	}
	p.mustIoctl(t, "-g")
	if n, _ := libtpmsRss(codeRss(t, pid)); n == 0 {
		t.Error("libtpms' code is not mapped again after a command")
	}
	p.shutdown(t)
}
