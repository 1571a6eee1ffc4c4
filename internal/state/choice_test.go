package state

import (
	"errors"
	"slices"
	"testing"

	"vtpm/internal/errdefs"
)

func TestParseFormat(t *testing.T) {
	tests := []struct {
		in   string
		want Format
		ok   bool
	}{
		{"", "", true},
		{"sealed", Sealed, true},
		{"swtpm", Swtpm, true},
		{"Swtpm", "", false},
		{"dir", "", false},
	}
	for _, tt := range tests {
		got, err := ParseFormat(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseFormat(%q) = %q, %v; want %q, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
		if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseFormat(%q): %v is not an invalid argument", tt.in, err)
		}
	}
	env := map[string]string{FormatEnv: "swtpm"}
	if f, err := FormatFromEnv(func(k string) string { return env[k] }); err != nil || f != Swtpm {
		t.Errorf("FormatFromEnv(%s=swtpm) = %q, %v", FormatEnv, f, err)
	}
	env[FormatEnv] = "tpm2"
	if _, err := FormatFromEnv(func(k string) string { return env[k] }); err == nil {
		t.Errorf("FormatFromEnv(%s=tpm2) succeeded", FormatEnv)
	}
}

func TestChooseExplicit(t *testing.T) {
	none := func(*testing.T, string) {}
	swtpmFiles := func(t *testing.T, d string) { touch(t, d, "tpm2-00.permall") }
	sealedState := func(t *testing.T, d string) { sealed(t, d, true) }
	tests := []struct {
		name     string
		setup    func(t *testing.T, dir string)
		linear   bool
		swtpmKey bool
		want     Format
		got      Format
		kind     error          // the error's kind, nil for success
		fix      errdefs.Action // a remedy's action the error must offer
	}{
		{"no request: Choose decides", none, false, false, "", Sealed, nil, ""},
		{"no request, swtpm files", swtpmFiles, false, false, "", Swtpm, nil, ""},
		{"swtpm asked for a new directory", none, false, false, Swtpm, Swtpm, nil, ""},
		{"sealed asked for a new directory with a swtpm key", none, false, true, Sealed, Sealed, nil, ""},
		{"swtpm asked, swtpm files", swtpmFiles, false, false, Swtpm, Swtpm, nil, ""},
		{"sealed asked, sealed state", sealedState, false, false, Sealed, Sealed, nil, ""},
		{"swtpm asked, sealed identity without blobs", func(t *testing.T, d string) { sealed(t, d, false) }, false, false, Swtpm, "", errdefs.ErrFailedPrecondition, ""},
		{"swtpm asked, sealed state", sealedState, false, false, Swtpm, "", errdefs.ErrFailedPrecondition, ""},
		{"sealed asked, swtpm files", swtpmFiles, false, false, Sealed, "", errdefs.ErrFailedPrecondition, errdefs.ActionStateImport},
		{"swtpm asked, linear file", none, true, false, Swtpm, Swtpm, nil, ""},
		{"sealed asked, linear file", none, true, false, Sealed, "", errdefs.ErrInvalidArgument, ""},
		{"unknown format", none, false, false, "tpm2", "", errdefs.ErrInvalidArgument, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tt.setup(t, dir)
			if tt.linear {
				dir = ""
			}
			got, err := ChooseExplicit(dir, tt.swtpmKey, tt.want)
			if got != tt.got {
				t.Errorf("ChooseExplicit = %q, want %q", got, tt.got)
			}
			if tt.kind == nil {
				if err != nil {
					t.Fatalf("ChooseExplicit: %v", err)
				}
				return
			}
			if !errors.Is(err, tt.kind) || errdefs.KindOf(err) != tt.kind {
				t.Fatalf("ChooseExplicit: %v; want kind %v", err, tt.kind)
			}
			if tt.fix != "" && !slices.ContainsFunc(errdefs.Remedies(err), func(r errdefs.Remedy) bool {
				return r.Action == tt.fix && r.Args["dir"] == dir
			}) {
				t.Errorf("remedies %+v lack %s for %s", errdefs.Remedies(err), tt.fix, dir)
			}
		})
	}
}
