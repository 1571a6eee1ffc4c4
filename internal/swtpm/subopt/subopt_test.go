package subopt

import (
	"maps"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	allowed := []string{"dir", "mode", "remove", "path"}
	tests := []struct {
		in      string
		want    map[string]string
		wantErr string
	}{
		{in: "", want: map[string]string{}},
		{in: "dir=/a/b", want: map[string]string{"dir": "/a/b"}},
		{in: "dir=/a,mode=0600", want: map[string]string{"dir": "/a", "mode": "0600"}},
		{in: "remove", want: map[string]string{"remove": "true"}},
		{in: "remove=false,", want: map[string]string{"remove": "false"}},
		{in: "path=a=b", want: map[string]string{"path": "a=b"}},
		{in: "dir=", want: map[string]string{"dir": ""}},
		{in: "bogus=1", wantErr: `unknown sub-option "bogus"`},
		{in: "dir=/a,dir=/b", wantErr: "more than once"},
		{in: "=x", wantErr: "has no name"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := Parse(tt.in, allowed...)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse(%q) error = %v, want it to contain %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.in, err)
			}
			if !maps.Equal(got, tt.want) {
				t.Fatalf("Parse(%q) = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
}

func TestBool(t *testing.T) {
	tests := []struct {
		in      string
		want    bool
		wantErr bool
	}{
		{"true", true, false},
		{"false", false, false},
		{"yes", false, true},
		{"", false, true},
	}
	for _, tt := range tests {
		got, err := Bool("remove", tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("Bool(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}
