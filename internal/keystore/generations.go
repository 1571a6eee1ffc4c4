package keystore

import (
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"slices"
	"sync"
	"syscall"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"
)

// Generation records (see the package documentation, "Generation records").
const (
	genMagic    = "VTGN"
	genVersion  = 1
	genHeader   = 5 // magic, version
	genSlotSize = 1024
	genSlots    = 2
	// genPlainLen is the fixed plaintext length of a slot: every slot has
	// the same size, so a slot is valid or not, never shorter.
	genPlainLen   = genSlotSize - genHeader - nonceLen - 16
	genSecretInfo = "vtpm keystore generations v1"
	genKeyInfo    = "vtpm generation record v1 "
)

// Generations remembers, in the keystore, the last generation seen of each
// state blob of each TPM (one record per TPM under kind "generations"). It
// satisfies seal.Generations. Record is monotonic across goroutines and
// processes: it reads, raises and writes the record holding an exclusive
// flock on the record file.
type Generations struct {
	k *Keystore
}

// Generations returns the keystore's generation records.
func (k *Keystore) Generations() *Generations { return &Generations{k: k} }

// genRecord is the content of one slot.
type genRecord struct {
	seq  uint64 // raised by every write; the valid slot with the highest wins
	gens map[string]uint64
}

// genFile is one TPM's open record file.
type genFile struct {
	f    *os.File
	path string
	id   uuid.UUID
	aead cipher.AEAD // this TPM's record key
	log  *slog.Logger
}

// genAEAD returns the AEAD of TPM id's generation record. Its key is
// derived for that record only, so a holder of it (a Pinned in a process
// that dropped its privileges) can neither read nor forge anything else.
func (k *Keystore) genAEAD(id uuid.UUID) (cipher.AEAD, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return nil, errClosed
	}
	aead, err := lockedAEAD(k.genSecret.Bytes(), genKeyInfo+id.String())
	if err != nil {
		return nil, fmt.Errorf("derive the generation record key of TPM %s: %w", id, err)
	}
	return aead, nil
}

func genAD(id uuid.UUID, slot int) []byte {
	ad := make([]byte, 0, genHeader+len(genKind)+1+36+2)
	ad = append(ad, genMagic...)
	ad = append(ad, genVersion)
	ad = append(ad, genKind...)
	ad = append(ad, 0)
	ad = append(ad, id.String()...)
	return append(ad, 0, byte(slot))
}

func encodeGenRecord(id uuid.UUID, r genRecord) ([]byte, error) {
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range r.gens {
			if !yield(n) {
				return
			}
		}
	})
	p := make([]byte, 10, genPlainLen)
	binary.BigEndian.PutUint64(p, r.seq)
	binary.BigEndian.PutUint16(p[8:], uint16(len(names)))
	for _, n := range names {
		if len(n) == 0 || len(n) > 255 {
			return nil, fmt.Errorf("generation record of TPM %s: blob name %q must be 1-255 bytes long", id, n)
		}
		if len(p)+1+len(n)+8 > genPlainLen {
			return nil, fmt.Errorf("generation record of TPM %s is full (%d blob names fit in %d bytes); this TPM has unexpectedly many state blobs: %v", id, len(names), genPlainLen, names)
		}
		p = append(p, byte(len(n)))
		p = append(p, n...)
		p = binary.BigEndian.AppendUint64(p, r.gens[n])
	}
	return p[:genPlainLen], nil // zero padding
}

func decodeGenRecord(p []byte) (genRecord, bool) {
	if len(p) != genPlainLen {
		return genRecord{}, false
	}
	r := genRecord{seq: binary.BigEndian.Uint64(p), gens: map[string]uint64{}}
	n := int(binary.BigEndian.Uint16(p[8:]))
	p = p[10:]
	for range n {
		if len(p) < 1 || len(p) < 1+int(p[0])+8 {
			return genRecord{}, false
		}
		l := int(p[0])
		r.gens[string(p[1:1+l])] = binary.BigEndian.Uint64(p[1+l:])
		p = p[1+l+8:]
	}
	return r, true
}

// sealSlot encrypts r for slot.
func sealSlot(aead cipher.AEAD, id uuid.UUID, slot int, r genRecord) ([]byte, error) {
	plain, err := encodeGenRecord(id, r)
	if err != nil {
		return nil, err
	}
	out := make([]byte, genHeader+nonceLen, genSlotSize)
	copy(out, genMagic)
	out[4] = genVersion
	if _, err := rand.Read(out[genHeader:]); err != nil {
		return nil, fmt.Errorf("generate nonce: %w", err)
	}
	return aead.Seal(out, out[genHeader:], plain, genAD(id, slot)), nil
}

// read returns the newest valid slot's record and its index. A slot that
// does not verify (torn by a crash mid-write) is ignored; a file with no
// valid slot is ErrCorrupt. The caller holds the file's flock.
func (g *genFile) read() (genRecord, int, error) {
	buf := make([]byte, genSlots*genSlotSize)
	n, err := g.f.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return genRecord{}, 0, ownerOr(err, g.path, "read generation record %s: %v; check the disk", g.path, err)
	}
	buf = buf[:n]
	best, newest := genRecord{}, -1
	for slot := range genSlots {
		lo := slot * genSlotSize
		if len(buf) < lo+genSlotSize {
			if len(buf) > lo && !allZero(buf[lo:]) {
				g.log.Warn("generation record: ignoring a slot cut short, as a crash mid-write leaves it", "file", g.path, "slot", slot)
			}
			continue
		}
		s := buf[lo : lo+genSlotSize]
		r, ok := g.openSlot(slot, s)
		if !ok {
			if !allZero(s) {
				g.log.Warn("generation record: ignoring a slot that does not verify, as a crash mid-write leaves it", "file", g.path, "slot", slot)
			}
			continue
		}
		if newest < 0 || r.seq > best.seq {
			best, newest = r, slot
		}
	}
	if newest < 0 {
		return genRecord{}, 0, errf(ErrCorrupt, nil, "generation record %s of TPM %s has no slot that decrypts (it was modified, or written under another master key); restore it from backup, or delete it to accept the TPM's current state as genuine", g.path, g.id)
	}
	return best, newest, nil
}

func (g *genFile) openSlot(slot int, s []byte) (genRecord, bool) {
	if string(s[:4]) != genMagic || s[4] != genVersion {
		return genRecord{}, false
	}
	plain, err := g.aead.Open(nil, s[genHeader:genHeader+nonceLen], s[genHeader+nonceLen:], genAD(g.id, slot))
	if err != nil {
		return genRecord{}, false
	}
	return decodeGenRecord(plain)
}

func allZero(b []byte) bool { return !slices.ContainsFunc(b, func(c byte) bool { return c != 0 }) }

// write puts r into slot in place and makes it durable.
func (g *genFile) write(slot int, r genRecord) error {
	data, err := sealSlot(g.aead, g.id, slot, r)
	if err != nil {
		return err
	}
	if _, err := g.f.WriteAt(data, int64(slot*genSlotSize)); err != nil {
		return permOr(err, "write generation record %s: %v; free disk space and retry", g.path, err)
	}
	if err := unix.Fdatasync(int(g.f.Fd())); err != nil {
		return errf(errGeneric, err, "fdatasync generation record %s: %v; check the file system for errors", g.path, err)
	}
	return nil
}

// lock takes the record file's flock (exclusive or shared), waiting for
// other processes.
func (g *genFile) lock(how int) (func(), error) {
	for {
		err := syscall.Flock(int(g.f.Fd()), how)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return nil, errf(errGeneric, err, "lock generation record %s: %v; check that it is on a local file system that supports flock", g.path, err)
		}
		return func() { _ = syscall.Flock(int(g.f.Fd()), syscall.LOCK_UN) }, nil
	}
}

func (g *genFile) last(name string) (uint64, error) {
	unlock, err := g.lock(syscall.LOCK_SH)
	if err != nil {
		return 0, err
	}
	defer unlock()
	r, _, err := g.read()
	if err != nil {
		return 0, err
	}
	return r.gens[name], nil
}

// record raises name to gen: it reads the newest slot and writes the other
// one, which therefore never holds the newest copy while it is written.
func (g *genFile) record(name string, gen uint64) error {
	if name == "" {
		return fmt.Errorf("record generation %d for TPM %s: empty blob name", gen, g.id)
	}
	unlock, err := g.lock(syscall.LOCK_EX)
	if err != nil {
		return err
	}
	defer unlock()
	r, newest, err := g.read()
	if err != nil {
		return err
	}
	if gen <= r.gens[name] {
		return nil
	}
	r.gens[name] = gen
	r.seq++
	if err := g.write(1-newest, r); err != nil {
		return fmt.Errorf("record generation %d of %s for TPM %s: %w", gen, name, g.id, err)
	}
	return nil
}

// openGenFile opens TPM id's record; with create, it first creates a record
// holding no generations (under the keystore's writers' lock) if there is
// none. Without create, an absent record gives an error wrapping
// fs.ErrNotExist.
func (k *Keystore) openGenFile(id uuid.UUID, create bool) (*genFile, error) {
	aead, err := k.genAEAD(id)
	if err != nil {
		return nil, err
	}
	p := k.path(genKind, id.String())
	g := &genFile{path: p, id: id, aead: aead, log: k.log}
	open := func() error {
		g.f, err = os.OpenFile(p, os.O_RDWR|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
		if errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if err != nil {
			return ownerOr(err, p, "open generation record %s: %v", p, err)
		}
		return nil
	}
	err = open()
	if !create || !errors.Is(err, fs.ErrNotExist) {
		return g, err
	}
	err = k.withLock(func() error {
		if err := open(); !errors.Is(err, fs.ErrNotExist) {
			return err // another process created it meanwhile
		}
		// The first write creates the whole file by rename, so a record
		// file always holds at least one valid slot.
		slot0, err := sealSlot(aead, id, 0, genRecord{seq: 1, gens: map[string]uint64{}})
		if err != nil {
			return err
		}
		kdir, err := k.kindDir(genKind)
		if err != nil {
			return err
		}
		k.removeStaleTemps(kdir, id.String())
		if err := writeFileAtomic(kdir, id.String(), slices.Concat(slot0, make([]byte, genSlotSize))); err != nil {
			return fmt.Errorf("create generation record of TPM %s: %w", id, err)
		}
		return open()
	})
	return g, err
}

// Last returns the last generation recorded for blob name of TPM id, or 0.
func (g *Generations) Last(id uuid.UUID, name string) (uint64, error) {
	f, err := g.k.openGenFile(id, false)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.f.Close()
	return f.last(name)
}

// Record notes gen as seen for blob name of TPM id. The stored value never
// decreases: recording an older generation is a no-op.
func (g *Generations) Record(id uuid.UUID, name string, gen uint64) error {
	if name == "" {
		return fmt.Errorf("record generation %d for TPM %s: empty blob name", gen, id)
	}
	f, err := g.k.openGenFile(id, true)
	if err != nil {
		return err
	}
	defer f.f.Close()
	return f.record(name, gen)
}

// Pin opens (creating it if needed) the generation record of TPM id and
// keeps it open, so that the returned Pinned can go on recording that TPM's
// generations after the process has dropped the privileges the keystore
// needs, or the Keystore has been closed. Pin needs the keystore's owner.
func (g *Generations) Pin(id uuid.UUID) (*Pinned, error) {
	f, err := g.k.openGenFile(id, true)
	if err != nil {
		return nil, err
	}
	// Fail now, while the error can still be fixed by whoever started us.
	if _, err := f.last(""); err != nil {
		f.f.Close()
		return nil, err
	}
	return &Pinned{f: f}, nil
}

// Pinned is the generation record of one TPM, held open by a file
// descriptor and a key that opens only that record (see Generations.Pin).
// It satisfies seal.Generations for that TPM and refuses others. Writes go
// in place through the descriptor: no directory access is needed.
//
// Record stays monotonic: mu serialises this process's writers, and the
// flock on the record file those of other processes (Generations in a CLI
// command, or a second instance of a copied state directory with the same
// UUID). The instance also holds its state directory's lock, so normally
// this process is the TPM's only writer anyway.
type Pinned struct {
	mu sync.Mutex
	f  *genFile // nil once closed
}

func (p *Pinned) file(id uuid.UUID) (*genFile, error) {
	if p.f == nil {
		return nil, fmt.Errorf("generation record of TPM %s: used after Close", id)
	}
	if id != p.f.id {
		return nil, fmt.Errorf("generation record pinned for TPM %s cannot serve TPM %s; use the keystore's Generations for other TPMs", p.f.id, id)
	}
	return p.f, nil
}

// Last returns the last generation recorded for blob name of the pinned TPM.
func (p *Pinned) Last(id uuid.UUID, name string) (uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f, err := p.file(id)
	if err != nil {
		return 0, err
	}
	return f.last(name)
}

// Record notes gen as seen for blob name of the pinned TPM; it never lowers
// a recorded value.
func (p *Pinned) Record(id uuid.UUID, name string, gen uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	f, err := p.file(id)
	if err != nil {
		return err
	}
	return f.record(name, gen)
}

// TPM returns the UUID of the pinned TPM.
func (p *Pinned) TPM() uuid.UUID {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.f == nil {
		return uuid.Nil
	}
	return p.f.id
}

// Close closes the record file. It is safe to call more than once.
func (p *Pinned) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.f == nil {
		return nil
	}
	err := p.f.f.Close()
	p.f = nil
	return err
}
