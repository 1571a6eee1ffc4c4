package main

import (
	"io"
	"strings"
	"testing"

	"vtpm/internal/testutil"
)

// TestKeyServiceSection runs section 13 with small counts on real
// vtpm-keyservice processes: every series and the recovery after kill -9
// appear in its table.
func TestKeyServiceSection(t *testing.T) {
	bin := testutil.KeyserviceBinary(t)
	b := &bench{
		base:            t.TempDir(),
		keyserviceBin:   bin,
		keyserviceShown: "vtpm-keyservice",
		cfg:             config{ksReleases: 6, ksHosts: 2, ksKills: 1},
		log:             io.Discard,
	}
	rows, err := b.keyService()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].table == "" {
		t.Fatalf("rows = %+v, want one table", rows)
	}
	table := rows[0].table
	for _, want := range []string{
		"| key release | 1 | 1 | 6 |",
		"| key release | 1 | 2 | 6 |",
		"| key release | 3 | 1 | 6 |",
		"| key release | 3 | 2 | 6 |",
		"| opening a TPM's key: a release against a local protector open | 1 | 1 | 6 |",
		"| recovery after kill -9 of the node hosts try first (the etcd leader), ms until a release succeeds | 3 | 3 | 1 |",
		"`vtpm-bench -only 13 -ks-releases 6 -ks-hosts 2 -ks-kills 1`",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
}
