package guardian

import (
	"bytes"
	"testing"

	"github.com/google/uuid"
)

// BenchmarkOpen measures loading a protector from disk form: parsing and
// verifying it (certificates and owner signature) and unwrapping the DEK.
func BenchmarkOpen(b *testing.B) {
	for _, kem := range kems {
		b.Run(kem.String(), func(b *testing.B) {
			owner := guardianFor(b, "host:alpha", kem)
			other := guardianFor(b, "host:beta", DHKEMP256)
			p, err := NewProtector(uuid.New(), newDEK(b), owner, other)
			if err != nil {
				b.Fatal(err)
			}
			data := p.Marshal()
			gs := []*Guardian{owner}
			b.ReportAllocs()
			for b.Loop() {
				q, err := ParseProtector(data)
				if err != nil {
					b.Fatal(err)
				}
				if _, _, err := q.Open(gs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkUnwrap measures Open alone, on a protector already verified.
func BenchmarkUnwrap(b *testing.B) {
	for _, kem := range kems {
		b.Run(kem.String(), func(b *testing.B) {
			owner := guardianFor(b, "host:alpha", kem)
			p, err := NewProtector(uuid.New(), newDEK(b), owner)
			if err != nil {
				b.Fatal(err)
			}
			gs := []*Guardian{owner}
			for b.Loop() {
				if _, _, err := p.Open(gs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkGrant measures adding a row for a public guardian of each KEM and
// re-signing.
func BenchmarkGrant(b *testing.B) {
	owner := guardianFor(b, "host:alpha", MLKEM768X25519)
	for _, kem := range kems {
		b.Run(kem.String(), func(b *testing.B) {
			g := guardianFor(b, "host:gamma", kem).Public()
			dek := newDEK(b)
			p, err := NewProtector(uuid.New(), dek, owner)
			if err != nil {
				b.Fatal(err)
			}
			rows := p.rows
			for b.Loop() {
				p.rows = rows
				if err := p.Grant(dek, g, owner); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRewrap1000 measures granting a new guardian on 1,000 stored
// protectors, as when a host joins a fleet: for each, parse and verify,
// open with the owner, grant, and marshal. One op is all 1,000.
func BenchmarkRewrap1000(b *testing.B) {
	const n = 1000
	owner := guardianFor(b, "host:alpha", MLKEM768X25519)
	stored := make([][]byte, n)
	for i := range stored {
		p, err := NewProtector(uuid.New(), newDEK(b), owner)
		if err != nil {
			b.Fatal(err)
		}
		stored[i] = p.Marshal()
	}
	for _, kem := range kems {
		b.Run("to "+kem.String(), func(b *testing.B) {
			g := guardianFor(b, "host:gamma", kem).Public()
			gs := []*Guardian{owner}
			var out []byte
			for b.Loop() {
				for _, data := range stored {
					p, err := ParseProtector(data)
					if err != nil {
						b.Fatal(err)
					}
					dek, _, err := p.Open(gs)
					if err != nil {
						b.Fatal(err)
					}
					if err := p.Grant(dek, g, owner); err != nil {
						b.Fatal(err)
					}
					out = p.Marshal()
				}
			}
			if !bytes.Contains(out, []byte(g.Fingerprint())) {
				b.Fatal("re-wrapped protector lacks the new row")
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n)/1e3, "µs/protector")
		})
	}
}

func FuzzParseProtector(f *testing.F) {
	owner := guardianFor(f, "host:alpha", MLKEM768X25519)
	beta := guardianFor(f, "host:beta", DHKEMP256)
	p, err := NewProtector(uuid.New(), newDEK(f), owner, beta)
	if err != nil {
		f.Fatal(err)
	}
	good := p.Marshal()
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte(`{"format":1}`))
	f.Add([]byte(`{"format":2,"version":1}`))
	old := *p
	old.version = 0 // a format 1 file, as written before versions
	if err := old.sign(owner); err != nil {
		f.Fatal(err)
	}
	f.Add(old.Marshal())
	f.Fuzz(func(t *testing.T, data []byte) {
		q, err := ParseProtector(data)
		if err != nil {
			return
		}
		// Anything accepted is signed by its owner and re-encodes to a
		// protector that verifies the same way, at the same version.
		r, err := ParseProtector(q.Marshal())
		if err != nil {
			t.Fatalf("re-encoded protector does not verify: %v", err)
		}
		if r.Version() != q.Version() {
			t.Fatalf("version %d re-encoded as %d", q.Version(), r.Version())
		}
	})
}
