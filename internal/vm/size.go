package vm

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Size units.
const (
	KiB int64 = 1 << (10 * (iota + 1))
	MiB
	GiB
	TiB
)

// Bounds of a VM's memory and disk sizes and CPU count.
const (
	MinMemory   = 16 * MiB
	MaxMemory   = 4 * TiB
	MinDiskSize = 1 * MiB
	MaxDiskSize = 64 * TiB
	MaxCPUs     = 512
)

// ParseSize reads a size as QEMU writes them: digits and an optional
// binary suffix K, M, G or T (also KiB, MB, ...; case-insensitive). A bare
// number counts in unit (MiB for memory, bytes for disks, as QEMU and
// qemu-img read them). Anything else, a sign or a fraction included, is
// refused, so that a size can never be read as an option by the tool it is
// handed to.
func ParseSize(s string, unit int64) (int64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("size %q: want a number with an optional unit (K, M, G, T), such as 20G", s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	mult := unit
	switch suf := strings.ToUpper(t[i:]); suf {
	case "":
	case "B":
		mult = 1
	case "K", "KB", "KIB":
		mult = KiB
	case "M", "MB", "MIB":
		mult = MiB
	case "G", "GB", "GIB":
		mult = GiB
	case "T", "TB", "TIB":
		mult = TiB
	default:
		return 0, fmt.Errorf("size %q: unknown unit %q (want K, M, G or T)", s, t[i:])
	}
	if n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n * mult, nil
}

// parseBounded is ParseSize within [lo, hi]; what names the value.
func parseBounded(what, s string, unit, lo, hi int64) (int64, error) {
	n, err := ParseSize(s, unit)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	if n < lo || n > hi {
		return 0, fmt.Errorf("%s %s is out of range: want %s to %s", what, s, FormatSize(lo), FormatSize(hi))
	}
	return n, nil
}

// ParseMemory checks a guest memory size (a bare number is MiB) and
// returns it in bytes.
func ParseMemory(s string) (int64, error) {
	n, err := parseBounded("memory", s, MiB, MinMemory, MaxMemory)
	if err == nil && n%MiB != 0 {
		return 0, fmt.Errorf("memory %s: give a whole number of MiB", s)
	}
	return n, err
}

// ParseDiskSize checks the size of a new disk (a bare number is bytes)
// and returns it in bytes.
func ParseDiskSize(s string) (int64, error) {
	return parseBounded("disk size", s, 1, MinDiskSize, MaxDiskSize)
}

// CheckCPUs checks a virtual CPU count.
func CheckCPUs(n int) error {
	if n < 1 || n > MaxCPUs {
		return fmt.Errorf("%d CPUs is out of range: want 1 to %d", n, MaxCPUs)
	}
	return nil
}

// FormatSize writes n bytes with the largest binary unit that divides it.
func FormatSize(n int64) string {
	for _, u := range []struct {
		s string
		n int64
	}{{"T", TiB}, {"G", GiB}, {"M", MiB}, {"K", KiB}} {
		if n >= u.n && n%u.n == 0 {
			return strconv.FormatInt(n/u.n, 10) + u.s
		}
	}
	return strconv.FormatInt(n, 10)
}
