package main

import (
	"strings"
	"testing"
)

func TestTargetText(t *testing.T) {
	for _, c := range []struct {
		t    float64
		want string
	}{
		{0, "—"}, {1, "≤ swtpm"}, {2, "≤ 2× swtpm"}, {1.0 / 3, "≤ 1/3 of swtpm"}, {0.75, "≤ 0.75× swtpm"},
	} {
		if got := targetText(c.t); got != c.want {
			t.Errorf("targetText(%g) = %q, want %q", c.t, got, c.want)
		}
	}
}

func TestVtpmOnlyAndSkippedRows(t *testing.T) {
	rows := []row{
		{section: "7. S", skip: "no tool"},
		vtpmRow("fast", "ms", []float64{1, 2, 3}, 5, ""),
		vtpmRow("slow", "ms", []float64{6, 7, 8}, 5, ""),
		vtpmRow("info", "ms", []float64{1}, 0, ""),
	}
	for i := range rows {
		rows[i].judge()
	}
	if !rows[1].pass || rows[2].pass {
		t.Errorf("pass = %v, %v; want true, false", rows[1].pass, rows[2].pass)
	}
	r := report{rows: rows}
	out := r.tables()
	for _, want := range []string{
		"### 7. S\n\nSkipped: no tool.\n",
		"| vtpm median | vtpm p95 | swtpm | target | result |",
		"| fast | ms | 3 | 2.00 | 3.00 | no equivalent | median ≤ 5 ms | pass |",
		"| slow | ms | 3 | 7.00 | 8.00 | no equivalent | median ≤ 5 ms | **FAIL** |",
		"| info | ms | 1 | 1.00 | 1.00 | no equivalent | — | report only |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("tables() lacks %q:\n%s", want, out)
		}
	}
	if got, want := r.summaryLine(), "1 of 2 targets met. Missed: slow."; got != want {
		t.Errorf("summaryLine() = %q, want %q", got, want)
	}
}

func TestTableRow(t *testing.T) {
	rows := []row{{section: "13. K", name: "k", table: "| a | b |\n|---|---|\n| 1 | 2 |\n"}}
	rows[0].judge()
	r := report{rows: rows}
	if got, want := r.tables(), "\n### 13. K\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"; got != want {
		t.Errorf("tables() = %q, want %q", got, want)
	}
	if rows[0].result != "report only" {
		t.Errorf("result = %q, want report only", rows[0].result)
	}
	if got, want := r.summaryLine(), "0 of 0 targets met."; got != want {
		t.Errorf("summaryLine() = %q, want %q", got, want)
	}
}
