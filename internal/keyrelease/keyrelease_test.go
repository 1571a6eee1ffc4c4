package keyrelease

import (
	"testing"
	"time"
)

func TestRenewIn(t *testing.T) {
	tests := []struct {
		left, want time.Duration
	}{
		{8 * time.Hour, 8*time.Hour - 96*time.Minute}, // a fifth to spare
		{5 * time.Minute, 3 * time.Minute},            // at least two minutes to spare
		{time.Minute, 5 * time.Second},                // nearly expired: soon, not at once
		{-time.Minute, 5 * time.Second},               // expired
	}
	for _, tt := range tests {
		if got := renewIn(tt.left); got != tt.want {
			t.Errorf("renewIn(%v) = %v, want %v", tt.left, got, tt.want)
		}
	}
}
