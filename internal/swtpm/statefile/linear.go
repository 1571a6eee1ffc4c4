package statefile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/bits"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"

	"vtpm/internal/tpmrc"
)

// Layout of swtpm's file:// ("linear") backend: one file, a little-endian
// header, then one section per state holding the same encoded blob the
// directory backend would write.
const (
	linearMagic      = 0x737774706d6c696e // "swtpmlin"
	linearVersion    = 1
	linearEntries    = 15
	linearEntrySize  = 12
	linearHeaderSize = 12 + linearEntries*linearEntrySize
)

type linearEntry struct {
	offset, dataLen, sectionLen uint32
}

func (e linearEntry) end() uint32 { return e.offset + e.sectionLen }

// Linear is swtpm's file:// backend.
type Linear struct {
	path string
	key  *Key
	mode os.FileMode

	mu      sync.Mutex
	f       *os.File
	entries [linearEntries]linearEntry
	// capacity bounds a block device, which cannot grow; 0 for a file.
	capacity int64
}

// Storage is the method set shared by Dir and Linear.
type Storage interface {
	Init() error
	Load(name string) ([]byte, error)
	Store(name string, data []byte) error
	Delete(name string, mustExist bool) error
	States() ([]StateInfo, error)
	Close() error
}

// OpenBackendURI opens a --tpmstate backend-uri: dir://D or file://F.
func OpenBackendURI(uri string, key *Key, mode os.FileMode) (Storage, error) {
	switch {
	case strings.HasPrefix(uri, "dir://"):
		return OpenDir(strings.TrimPrefix(uri, "dir://"), key, mode)
	case strings.HasPrefix(uri, "file://"):
		return OpenLinear(strings.TrimPrefix(uri, "file://"), key, mode)
	}
	return nil, fmt.Errorf("backend-uri %q: unsupported scheme, use dir://DIRECTORY or file://FILE", uri)
}

// OpenLinear returns a store on the single file path, created on Init with
// mode (0 means DefaultMode) if missing.
func OpenLinear(path string, key *Key, mode os.FileMode) (*Linear, error) {
	if key != nil {
		if err := key.check(); err != nil {
			return nil, fmt.Errorf("state file %s: %w", path, err)
		}
	}
	if path == "" {
		return nil, errors.New("file:// backend needs a path, as in file:///var/lib/tpm/state")
	}
	if mode == 0 {
		mode = DefaultMode
	}
	return &Linear{path: path, key: key, mode: mode.Perm()}, nil
}

// Init opens (formatting if empty) and locks the file. Other methods call
// it implicitly, as swtpm opens the store on first use.
func (l *Linear) Init() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open()
}

func (l *Linear) open() error {
	if l.f != nil {
		return nil
	}
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_CREATE, l.mode)
	if err != nil {
		return fmt.Errorf("opening state file %s: %w: %w", l.path, err, tpmrc.TPMFail)
	}
	lk := syscall.Flock_t{Type: syscall.F_WRLCK}
	if err := syscall.FcntlFlock(f.Fd(), syscall.F_SETLK, &lk); err != nil {
		f.Close()
		return fmt.Errorf("locking %s: %w; another TPM process is using it, stop it first: %w", l.path, err, tpmrc.TPMFail)
	}
	l.f = f
	if err := l.readHeader(); err != nil {
		l.f = nil
		f.Close()
		return err
	}
	return nil
}

func (l *Linear) readHeader() error {
	fi, err := l.f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w: %w", l.path, err, tpmrc.TPMFail)
	}
	if fi.Mode().IsRegular() && fi.Size() == 0 {
		l.entries = [linearEntries]linearEntry{}
		return l.writeHeader()
	}
	blockDev := fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0
	if blockDev {
		// A block device (a Proxmox tpmstate volume, a loop device) has
		// the size it was given: stat reports 0, seeking to its end tells.
		if l.capacity, err = l.f.Seek(0, io.SeekEnd); err != nil {
			return fmt.Errorf("size of %s: %w: %w", l.path, err, tpmrc.TPMFail)
		}
		if l.capacity < linearHeaderSize {
			return fmt.Errorf("block device %s holds %d bytes, too few for a state header (%d): %w", l.path, l.capacity, linearHeaderSize, tpmrc.TPMFail)
		}
	}
	hdr := make([]byte, linearHeaderSize)
	if _, err := l.f.ReadAt(hdr, 0); err != nil {
		return fmt.Errorf("reading header of %s: %w: %w", l.path, err, tpmrc.TPMFail)
	}
	// A new volume reads as zeros: it is formatted, as an empty file is.
	// Anything else that is not a state header is refused rather than
	// overwritten (swtpm would format it).
	if blockDev && !slices.ContainsFunc(hdr, func(b byte) bool { return b != 0 }) {
		l.entries = [linearEntries]linearEntry{}
		return l.writeHeader()
	}
	if binary.LittleEndian.Uint64(hdr) != linearMagic {
		return fmt.Errorf("%s is not a swtpm linear state file (bad magic); point file:// at an empty or swtpm-made file: %w", l.path, tpmrc.TPMFail)
	}
	if hdr[8] != linearVersion {
		return fmt.Errorf("%s has linear format version %d, only %d is supported: %w", l.path, hdr[8], linearVersion, tpmrc.TPMBadVersion)
	}
	if hs := binary.LittleEndian.Uint16(hdr[10:]); hs < linearHeaderSize {
		return fmt.Errorf("%s has header size %d, want at least %d: %w", l.path, hs, linearHeaderSize, tpmrc.TPMBadDataSize)
	}
	for i := range l.entries {
		b := hdr[12+i*linearEntrySize:]
		e := linearEntry{binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:]), binary.LittleEndian.Uint32(b[8:])}
		if e.offset != 0 && (e.dataLen > e.sectionLen || e.offset < linearHeaderSize) {
			return fmt.Errorf("%s: entry %d is corrupt (offset %d, length %d, section %d): %w", l.path, i, e.offset, e.dataLen, e.sectionLen, tpmrc.TPMFail)
		}
		l.entries[i] = e
	}
	return nil
}

func (l *Linear) writeHeader() error {
	hdr := binary.LittleEndian.AppendUint64(make([]byte, 0, linearHeaderSize), linearMagic)
	hdr = append(hdr, linearVersion, 0)
	hdr = binary.LittleEndian.AppendUint16(hdr, linearHeaderSize)
	for _, e := range l.entries {
		hdr = binary.LittleEndian.AppendUint32(hdr, e.offset)
		hdr = binary.LittleEndian.AppendUint32(hdr, e.dataLen)
		hdr = binary.LittleEndian.AppendUint32(hdr, e.sectionLen)
	}
	if _, err := l.f.WriteAt(hdr, 0); err != nil {
		return fmt.Errorf("writing header of %s: %w: %w", l.path, err, tpmrc.TPMFail)
	}
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w: %w", l.path, err, tpmrc.TPMFail)
	}
	return nil
}

func entryIndex(name string) (int, error) {
	for i, n := range blobNames {
		if n == name {
			return i, nil
		}
	}
	return 0, fmt.Errorf("unknown state %q; want permall, volatilestate or savestate: %w", name, tpmrc.TPMBadType)
}

// usedEnd is where the last section ends.
func (l *Linear) usedEnd() uint32 {
	end := uint32(linearHeaderSize)
	for _, e := range l.entries {
		if e.offset != 0 {
			end = max(end, e.end())
		}
	}
	return end
}

// Load returns the plain state stored under name; a missing one gives an
// error wrapping fs.ErrNotExist and tpmrc.TPMRetry.
func (l *Linear) Load(name string) ([]byte, error) {
	i, err := entryIndex(name)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.open(); err != nil {
		return nil, err
	}
	e := l.entries[i]
	if e.offset == 0 {
		return nil, fmt.Errorf("loading %s from %s: %w: %w", name, l.path, fs.ErrNotExist, tpmrc.TPMRetry)
	}
	data := make([]byte, e.dataLen)
	if _, err := l.f.ReadAt(data, int64(e.offset)); err != nil {
		return nil, fmt.Errorf("reading %s from %s: %w: %w", name, l.path, err, tpmrc.TPMFail)
	}
	plain, err := DecodeFile(data, l.key)
	if err != nil {
		return nil, fmt.Errorf("loading %s from %s: %w", name, l.path, err)
	}
	return plain, nil
}

// Store writes the state into its section, moving it to a new
// power-of-two sized section at the end when it outgrows the old one. The
// data is synced before the header that points at it.
func (l *Linear) Store(name string, data []byte) error {
	i, err := entryIndex(name)
	if err != nil {
		return err
	}
	enc, err := EncodeFile(data, l.key)
	if err != nil {
		return fmt.Errorf("storing %s: %w", name, err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.open(); err != nil {
		return err
	}
	n := uint32(len(enc))
	e := l.entries[i]
	if e.offset == 0 || n > e.sectionLen {
		section := uint32(1) << bits.Len32(n-1)
		if e.offset != 0 && e.end() == l.usedEnd() {
			e.sectionLen = section // last section: grow in place
		} else {
			e = linearEntry{offset: l.usedEnd(), sectionLen: section}
		}
	}
	if l.capacity > 0 && int64(e.end()) > l.capacity {
		return fmt.Errorf("storing %s: %s holds %d bytes, the state needs %d: %w", name, l.path, l.capacity, e.end(), tpmrc.TPMFail)
	}
	if _, err := l.f.WriteAt(enc, int64(e.offset)); err != nil {
		return fmt.Errorf("writing %s to %s: %w: %w", name, l.path, err, tpmrc.TPMFail)
	}
	e.dataLen = n
	l.entries[i] = e
	if err := l.truncate(); err != nil {
		return err
	}
	return l.writeHeader()
}

// truncate sizes a regular file to the sections in use.
func (l *Linear) truncate() error {
	fi, err := l.f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	if err := l.f.Truncate(int64(l.usedEnd())); err != nil {
		return fmt.Errorf("resizing %s: %w: %w", l.path, err, tpmrc.TPMFail)
	}
	return l.f.Sync()
}

// Delete drops the state; missing is an error only with mustExist.
func (l *Linear) Delete(name string, mustExist bool) error {
	i, err := entryIndex(name)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.open(); err != nil {
		return err
	}
	if l.entries[i].offset == 0 {
		if mustExist {
			return fmt.Errorf("deleting %s from %s: %w: %w", name, l.path, fs.ErrNotExist, tpmrc.TPMFail)
		}
		return nil
	}
	l.entries[i] = linearEntry{}
	if err := l.writeHeader(); err != nil {
		return err
	}
	return l.truncate()
}

// States lists the stored states with their encoded sizes.
func (l *Linear) States() ([]StateInfo, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.open(); err != nil {
		return nil, err
	}
	states := []StateInfo{}
	for i, name := range blobNames {
		if e := l.entries[i]; e.offset != 0 {
			states = append(states, StateInfo{Name: name, Size: int64(e.dataLen)})
		}
	}
	return states, nil
}

// Close releases the file and its lock.
func (l *Linear) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("closing %s: %w", l.path, err)
	}
	return nil
}
