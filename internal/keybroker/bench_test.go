package keybroker

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"vtpm/internal/guardian"
	"vtpm/internal/keystore"
	"vtpm/internal/seal"
)

// permallSize is about the size of libtpms' permanent state after a guest
// has used its TPM (a fresh one is about 1.3 KiB).
const permallSize = 4 << 10

// benchTPM creates a TPM on h whose state holds a permall blob.
func benchTPM(b *testing.B, h *Broker, dir string) *Opened {
	b.Helper()
	o, err := h.OpenTPM(dir)
	if err != nil {
		b.Fatal(err)
	}
	blob := make([]byte, permallSize)
	rand.Read(blob)
	writeBlob(b, dir, o.Key.bytes(), blob)
	return o
}

// loadState opens dir's sealed state with dek and decrypts permall, as a
// vTPM does before libtpms starts.
func loadState(b *testing.B, dir string, dek []byte) {
	s, err := seal.Open(dir, seal.Options{Key: dek, Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := s.Load("permall"); err != nil {
		b.Fatal(err)
	}
	s.Close()
}

// BenchmarkOpenTPM measures what a vTPM process does with keys before
// libtpms starts, part by part: open the host keystore (file-protected
// master key), open the TPM's key protector (read, verify the certificates
// and the owner's signature, HPKE-unwrap the data key), and decrypt the
// sealed state; and, for comparison, decrypting with a key given directly
// (--data-key).
func BenchmarkOpenTPM(b *testing.B) {
	root := b.TempDir()
	h := openHost(b, root)
	dir := filepath.Join(b.TempDir(), "tpm")
	o := benchTPM(b, h, dir)

	b.Run("keystore", func(b *testing.B) {
		for b.Loop() {
			k, err := Open(root, keystore.Options{HostTPM: "none", Logger: quiet()})
			if err != nil {
				b.Fatal(err)
			}
			k.Close()
		}
	})
	b.Run("protector", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := h.OpenTPM(dir); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("protector+state", func(b *testing.B) {
		for b.Loop() {
			got, err := h.OpenTPM(dir)
			if err != nil {
				b.Fatal(err)
			}
			loadState(b, dir, got.Key.bytes())
		}
	})
	b.Run("keystore+protector+state", func(b *testing.B) {
		for b.Loop() {
			k, err := Open(root, keystore.Options{HostTPM: "none", Logger: quiet()})
			if err != nil {
				b.Fatal(err)
			}
			got, err := k.OpenTPM(dir)
			if err != nil {
				b.Fatal(err)
			}
			loadState(b, dir, got.Key.bytes())
			k.Close()
		}
	})
	b.Run("data-key+state", func(b *testing.B) {
		for b.Loop() {
			loadState(b, dir, o.Key.bytes())
		}
	})
}

// BenchmarkGrant measures granting a guardian, given by its certificates,
// on one TPM as `vtpm protector grant` does: read and verify the protector,
// open it with the owner, add the row, re-sign, and write it crash-safely
// (temp file, fsync, rename, fsync of the directory). "in memory" leaves out
// the file reads and writes.
func BenchmarkGrant(b *testing.B) {
	h := newHost(b)
	owner := local(b, h)
	dir := filepath.Join(b.TempDir(), "tpm")
	benchTPM(b, h, dir)
	orig, err := os.ReadFile(filepath.Join(dir, ProtectorFile))
	if err != nil {
		b.Fatal(err)
	}
	for _, kem := range []guardian.KEM{guardian.MLKEM768X25519, guardian.DHKEMP256} {
		g, err := guardian.New("host:other", kem)
		if err != nil {
			b.Fatal(err)
		}
		pub := g.Public()
		b.Run(kem.String()+"/on disk", func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				if err := os.WriteFile(filepath.Join(dir, ProtectorFile), orig, 0o600); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				p, err := ReadProtector(dir)
				if err != nil {
					b.Fatal(err)
				}
				o, err := h.OpenTPM(dir)
				if err != nil {
					b.Fatal(err)
				}
				if err := p.Grant(o.Key.bytes(), pub, owner); err != nil {
					b.Fatal(err)
				}
				if err := WriteProtector(dir, p); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(kem.String()+"/in memory", func(b *testing.B) {
			gs := []*guardian.Guardian{owner}
			for b.Loop() {
				p, err := guardian.ParseProtector(orig)
				if err != nil {
					b.Fatal(err)
				}
				dek, _, err := p.Open(gs)
				if err != nil {
					b.Fatal(err)
				}
				if err := p.Grant(dek, pub, owner); err != nil {
					b.Fatal(err)
				}
				_ = p.Marshal()
			}
		})
	}
}

// BenchmarkRewrap1000 measures granting a new guardian on 1,000 TPMs stored
// on disk, as when a host joins a fleet and every TPM gets a row for the
// fleet's guardian: for each, read and verify the protector, open it with
// the owner, grant, re-sign and write it crash-safely. One op is all 1,000.
func BenchmarkRewrap1000(b *testing.B) {
	const n = 1000
	h := newHost(b)
	owner := local(b, h)
	base := b.TempDir()
	dirs := make([]string, n)
	orig := make([][]byte, n)
	for i := range dirs {
		dirs[i] = filepath.Join(base, fmt.Sprintf("tpm%04d", i))
		if _, err := h.OpenTPM(dirs[i]); err != nil {
			b.Fatal(err)
		}
		var err error
		if orig[i], err = os.ReadFile(filepath.Join(dirs[i], ProtectorFile)); err != nil {
			b.Fatal(err)
		}
	}
	for _, kem := range []guardian.KEM{guardian.MLKEM768X25519, guardian.DHKEMP256} {
		g, err := guardian.New("fleet", kem)
		if err != nil {
			b.Fatal(err)
		}
		pub := g.Public()
		b.Run("to "+kem.String(), func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				for i, d := range dirs {
					if err := os.WriteFile(filepath.Join(d, ProtectorFile), orig[i], 0o600); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
				gs, err := h.Guardians()
				if err != nil {
					b.Fatal(err)
				}
				for _, d := range dirs {
					p, err := ReadProtector(d)
					if err != nil {
						b.Fatal(err)
					}
					dek, _, err := p.Open(gs)
					if err != nil {
						b.Fatal(err)
					}
					if err := p.Grant(dek, pub, owner); err != nil {
						b.Fatal(err)
					}
					clear(dek)
					if err := WriteProtector(d, p); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*n), "µs/protector")
			p, err := ReadProtector(dirs[n-1])
			if err != nil || len(p.Rows()) != 2 || p.Rows()[1].Fingerprint != pub.Fingerprint() {
				b.Fatalf("re-wrapped protector: %v, %v; want a row for the new guardian", err, p)
			}
		})
	}
}
