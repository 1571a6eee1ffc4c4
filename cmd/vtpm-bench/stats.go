package main

import (
	"math"
	"math/rand/v2"
	"slices"
)

// summary describes one sample.
type summary struct {
	N      int
	Median float64
	P95    float64 // nearest rank: the maximum when N ≤ 20
	Mean   float64
	Stdev  float64
}

func summarize(xs []float64) summary {
	if len(xs) == 0 {
		return summary{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	var sum float64
	for _, x := range s {
		sum += x
	}
	mean := sum / float64(len(s))
	var ss float64
	for _, x := range s {
		ss += (x - mean) * (x - mean)
	}
	sd := 0.0
	if len(s) > 1 {
		sd = math.Sqrt(ss / float64(len(s)-1))
	}
	return summary{N: len(s), Median: median(s), P95: rank(s, 0.95), Mean: mean, Stdev: sd}
}

// median of a sorted sample.
func median(s []float64) float64 {
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// rank is the nearest-rank quantile q of a sorted sample.
func rank(s []float64, q float64) float64 {
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// ratioCI is a percentile-bootstrap 95% interval for median(b)/median(a).
// Samples of equal length are paired (a[i] and b[i] ran back to back), and
// are resampled as pairs, so that drift shared by a pair cancels out.
func ratioCI(a, b []float64, rounds int) (lo, hi float64) {
	if len(a) < 2 || len(b) < 2 {
		return math.NaN(), math.NaN()
	}
	r := rand.New(rand.NewPCG(1, 2)) // fixed seed: the same data gives the same interval
	paired := len(a) == len(b)
	ra, rb := make([]float64, len(a)), make([]float64, len(b))
	ratios := make([]float64, rounds)
	for k := range rounds {
		if paired {
			for i := range ra {
				j := r.IntN(len(a))
				ra[i], rb[i] = a[j], b[j]
			}
		} else {
			for i := range ra {
				ra[i] = a[r.IntN(len(a))]
			}
			for i := range rb {
				rb[i] = b[r.IntN(len(b))]
			}
		}
		slices.Sort(ra)
		slices.Sort(rb)
		ratios[k] = median(rb) / median(ra)
	}
	slices.Sort(ratios)
	return rank(ratios, 0.025), rank(ratios, 0.975)
}
