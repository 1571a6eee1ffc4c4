package transfer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

const (
	magic       = "VTPMBNDL"
	trailer     = "VTPMEND\n"
	version     = 1
	maxManifest = 1 << 20
	endOffset   = ^uint64(0)
	chunkSize   = 1 << 20
)

// Manifest lists a bundle's files ahead of their contents.
type Manifest struct {
	Format int       `json:"format"`
	VM     string    `json:"vm"`
	UUID   uuid.UUID `json:"uuid"`
	Files  []File    `json:"files"`
}

// File is one file of a bundle.
type File struct {
	Path string `json:"path"` // relative to the bundle, slash-separated
	Size int64  `json:"size"`
	// Data is how many bytes of it are sent: its size less its holes.
	Data int64       `json:"data"`
	Mode fs.FileMode `json:"mode"` // permission bits
}

// DataBytes is the data the stream carries, in all.
func (m *Manifest) DataBytes() int64 {
	var n int64
	for _, f := range m.Files {
		n += f.Data
	}
	return n
}

// Source is a file to send: read from Src, placed at Path in the bundle;
// or, when Src is "", Content itself.
type Source struct {
	Path    string
	Src     string
	Content []byte
	Mode    fs.FileMode
}

type extent struct{ off, n int64 }

// planned is a source with its extents found.
type planned struct {
	Source
	size    int64
	extents []extent
}

// Sender writes a bundle's stream. Plan finds every file's extents, so the
// manifest is known before the first byte is sent.
type Sender struct {
	Manifest Manifest
	files    []planned
	// Progress, when set, is called with the bytes of data sent so far.
	Progress func(sent int64)
}

// Plan prepares the stream of files for VM name (id): each Source's size
// and data extents (holes of sparse files are skipped).
func Plan(name string, id uuid.UUID, files []Source) (*Sender, error) {
	s := &Sender{Manifest: Manifest{Format: version, VM: name, UUID: id}}
	for _, f := range files {
		p := planned{Source: f}
		if f.Src == "" {
			p.size = int64(len(f.Content))
			if p.size > 0 {
				p.extents = []extent{{0, p.size}}
			}
		} else {
			var err error
			if p.size, p.extents, err = extents(f.Src); err != nil {
				return nil, err
			}
		}
		var data int64
		for _, e := range p.extents {
			data += e.n
		}
		s.files = append(s.files, p)
		s.Manifest.Files = append(s.Manifest.Files, File{Path: f.Path, Size: p.size, Data: data, Mode: f.Mode.Perm()})
	}
	if err := s.Manifest.check(Limits{}); err != nil {
		return nil, fmt.Errorf("the bundle cannot be sent: %w", err)
	}
	return s, nil
}

// extents returns the size of the file at p and the parts of it that hold
// data, found with SEEK_DATA and SEEK_HOLE (the whole file where the file
// system does not tell).
func extents(p string) (int64, []extent, error) {
	f, err := os.Open(p)
	if err != nil {
		return 0, nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, nil, err
	}
	if !st.Mode().IsRegular() {
		return 0, nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s is not a regular file", p)
	}
	size := st.Size()
	var out []extent
	const seekData, seekHole = 3, 4
	for off := int64(0); off < size; {
		start, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return size, []extent{{0, size}}, nil
		}
		end, err := f.Seek(start, seekHole)
		if err != nil || end > size {
			end = size
		}
		out = append(out, extent{start, end - start})
		off = end
	}
	return size, out, nil
}

// WriteTo writes the stream to w; ctx stops it between chunks.
func (s *Sender) WriteTo(ctx context.Context, w io.Writer) (int64, error) {
	bw := bufio.NewWriterSize(w, chunkSize)
	cw := &countWriter{w: bw}
	m, err := json.Marshal(s.Manifest)
	if err != nil {
		return 0, err
	}
	cw.Write([]byte(magic))
	cw.Write([]byte{version})
	binary.Write(cw, binary.BigEndian, uint32(len(m)))
	cw.Write(m)
	var sent int64
	buf := make([]byte, chunkSize)
	for _, f := range s.files {
		if err := s.writeFile(ctx, cw, f, buf, &sent); err != nil {
			return cw.n, fmt.Errorf("send %s: %w", f.Path, err)
		}
	}
	cw.Write([]byte(trailer))
	if cw.err != nil {
		return cw.n, cw.err
	}
	return cw.n, bw.Flush()
}

func (s *Sender) writeFile(ctx context.Context, w *countWriter, f planned, buf []byte, sent *int64) error {
	h := sha256.New()
	out := io.MultiWriter(w, h)
	var in io.ReaderAt
	if f.Src != "" {
		file, err := os.Open(f.Src)
		if err != nil {
			return err
		}
		defer file.Close()
		st, err := file.Stat()
		if err != nil {
			return err
		}
		if st.Size() != f.size {
			return fmt.Errorf("it changed since the manifest was made (size %d, now %d): stop what writes it", f.size, st.Size())
		}
		in = file
	} else {
		in = bytes.NewReader(f.Content)
	}
	for _, e := range f.extents {
		var hdr [16]byte
		binary.BigEndian.PutUint64(hdr[:8], uint64(e.off))
		binary.BigEndian.PutUint64(hdr[8:], uint64(e.n))
		out.Write(hdr[:])
		for done := int64(0); done < e.n; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(int64(len(buf)), e.n-done)
			if _, err := io.ReadFull(io.NewSectionReader(in, e.off+done, n), buf[:n]); err != nil {
				return fmt.Errorf("read at %d (did the file change while it was sent?): %w", e.off+done, err)
			}
			out.Write(buf[:n])
			if w.err != nil {
				return w.err
			}
			done += n
			*sent += n
			if s.Progress != nil {
				s.Progress(*sent)
			}
		}
	}
	var end [16]byte
	binary.BigEndian.PutUint64(end[:8], endOffset)
	w.Write(end[:])
	w.Write(h.Sum(nil))
	return w.err
}

type countWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	return n, err
}

// Limits bound what a receiver accepts. Zero values are the defaults.
type Limits struct {
	MaxFiles int   // default 1000
	MaxSize  int64 // of one file, default 4 TiB
	MaxData  int64 // in all, default 16 TiB (free space is checked too)
}

func (l Limits) withDefaults() Limits {
	if l.MaxFiles == 0 {
		l.MaxFiles = 1000
	}
	if l.MaxSize == 0 {
		l.MaxSize = 4 << 40
	}
	if l.MaxData == 0 {
		l.MaxData = 16 << 40
	}
	return l
}

// StreamError is a stream the receiver refused: what was wrong, and in
// which file when one.
type StreamError struct {
	File   string
	Reason string
}

func (e *StreamError) Error() string {
	if e.File == "" {
		return "the bundle stream was refused: " + e.Reason
	}
	return fmt.Sprintf("the bundle stream was refused: %s: %s", e.File, e.Reason)
}

// Is makes a StreamError data loss: what arrived is not what was sent.
func (e *StreamError) Is(target error) bool { return target == errdefs.ErrDataLoss }

func refuse(file, format string, a ...any) error {
	return &StreamError{File: file, Reason: fmt.Sprintf(format, a...)}
}

// check validates m as untrusted input.
func (m *Manifest) check(lim Limits) error {
	lim = lim.withDefaults()
	if m.Format != version {
		return refuse("", "manifest format %d, want %d", m.Format, version)
	}
	if len(m.Files) > lim.MaxFiles {
		return refuse("", "%d files, more than %d", len(m.Files), lim.MaxFiles)
	}
	seen := map[string]bool{}
	dirs := map[string]bool{}
	var total int64
	for _, f := range m.Files {
		if err := checkPath(f.Path); err != nil {
			return refuse(f.Path, "%v", err)
		}
		if seen[f.Path] || dirs[f.Path] {
			return refuse(f.Path, "named twice, or both a file and a directory")
		}
		seen[f.Path] = true
		for d := path.Dir(f.Path); d != "."; d = path.Dir(d) {
			if seen[d] {
				return refuse(f.Path, "its directory %s is also a file", d)
			}
			dirs[d] = true
		}
		if f.Size < 0 || f.Size > lim.MaxSize || f.Data < 0 || f.Data > f.Size {
			return refuse(f.Path, "size %d with %d bytes of data is out of bounds (at most %d)", f.Size, f.Data, lim.MaxSize)
		}
		if f.Mode&^fs.ModePerm != 0 {
			return refuse(f.Path, "mode %v: a bundle holds regular files only", f.Mode)
		}
		total += f.Data
		if total > lim.MaxData {
			return refuse("", "more than %d bytes of data", lim.MaxData)
		}
	}
	return nil
}

// checkPath accepts a relative, clean, slash-separated path of plain names.
func checkPath(p string) error {
	if p == "" || p != path.Clean(p) || strings.HasPrefix(p, "/") || !filepath.IsLocal(p) || strings.ContainsRune(p, '\\') {
		return errors.New("not a clean relative path")
	}
	parts := strings.Split(p, "/")
	if len(parts) > 8 {
		return errors.New("more than 8 levels deep")
	}
	for _, n := range parts {
		if n == "." || n == ".." || len(n) > 255 {
			return errors.New("a name is empty, '.', '..' or too long")
		}
		for _, r := range n {
			if r < 0x20 || r == 0x7f {
				return errors.New("a name holds control characters")
			}
		}
	}
	return nil
}

// Received is a bundle that arrived whole: its files verified, in Dir.
// Close it once Dir is moved away or removed.
type Received struct {
	Dir      string
	Manifest Manifest
	lock     *os.File
}

// Close releases the staging directory's lock: CleanIncoming may remove
// it from now on.
func (r *Received) Close() error { return r.lock.Close() }

const stagingPrefix = ".incoming-"

// lockDir takes an exclusive lock on the directory dir, held until the
// file returned is closed (or its process ends).
func lockDir(dir string, wait bool) (*os.File, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	how := syscall.LOCK_EX
	if !wait {
		how |= syscall.LOCK_NB
	}
	if err := syscall.Flock(int(f.Fd()), how); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// CleanIncoming removes the staging directories under parent that no
// receiver holds: left by a receiver that died mid-way. It returns their
// names.
func CleanIncoming(parent string) []string {
	entries, _ := os.ReadDir(parent)
	var gone []string
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), stagingPrefix) {
			continue
		}
		dir := filepath.Join(parent, e.Name())
		l, err := lockDir(dir, false)
		if err != nil {
			continue // in use, or gone
		}
		if os.RemoveAll(dir) == nil {
			gone = append(gone, e.Name())
		}
		l.Close()
	}
	return gone
}

// Receive reads a bundle's stream from r into a new staging directory
// under parent and verifies it: the manifest (see the package
// documentation), free space for its data, and every file's extents, size
// and digest. accept, when not nil, is called with the manifest before any
// file is written and may refuse it. On any failure the staging directory
// is removed and nothing is left.
func Receive(ctx context.Context, r io.Reader, parent string, lim Limits, accept func(*Manifest) error) (_ *Received, err error) {
	br := bufio.NewReaderSize(r, chunkSize)
	var head [len(magic) + 1 + 4]byte
	if _, err := io.ReadFull(br, head[:]); err != nil {
		return nil, refuse("", "no bundle header: %v", err)
	}
	if string(head[:len(magic)]) != magic || head[len(magic)] != version {
		return nil, refuse("", "not a version %d bundle stream", version)
	}
	mlen := binary.BigEndian.Uint32(head[len(magic)+1:])
	if mlen > maxManifest {
		return nil, refuse("", "manifest of %d bytes, more than %d", mlen, maxManifest)
	}
	mb := make([]byte, mlen)
	if _, err := io.ReadFull(br, mb); err != nil {
		return nil, refuse("", "manifest cut short: %v", err)
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(mb))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return nil, refuse("", "manifest: %v", err)
	}
	if err := m.check(lim); err != nil {
		return nil, err
	}
	if err := CheckSpace(parent, m.DataBytes()); err != nil {
		return nil, err
	}
	if accept != nil {
		if err := accept(&m); err != nil {
			return nil, err
		}
	}
	CleanIncoming(parent)
	dir, err := os.MkdirTemp(parent, stagingPrefix)
	if err != nil {
		return nil, err
	}
	lock, err := lockDir(dir, true)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
			lock.Close()
		}
	}()
	buf := make([]byte, chunkSize)
	for _, f := range m.Files {
		if err := receiveFile(ctx, br, dir, f, buf); err != nil {
			return nil, err
		}
	}
	var end [len(trailer)]byte
	if _, err := io.ReadFull(br, end[:]); err != nil || string(end[:]) != trailer {
		return nil, refuse("", "the stream does not end with its trailer")
	}
	if n, _ := br.Read(end[:1]); n != 0 {
		return nil, refuse("", "data after the trailer")
	}
	return &Received{Dir: dir, Manifest: m, lock: lock}, nil
}

func receiveFile(ctx context.Context, r io.Reader, dir string, f File, buf []byte) error {
	p := filepath.Join(dir, filepath.FromSlash(f.Path))
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	out, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, f.Mode.Perm()&^0o022)
	if err != nil {
		return fmt.Errorf("create %s: %w", f.Path, err)
	}
	defer out.Close()
	h := sha256.New()
	var next, data int64
	for {
		var hdr [16]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return refuse(f.Path, "cut short: %v", err)
		}
		off, n := binary.BigEndian.Uint64(hdr[:8]), binary.BigEndian.Uint64(hdr[8:])
		if off == endOffset && n == 0 {
			break
		}
		h.Write(hdr[:])
		if off > uint64(f.Size) || n > uint64(f.Size)-off || int64(off) < next || n == 0 {
			return refuse(f.Path, "extent %d+%d lies outside its size %d or out of order", off, n, f.Size)
		}
		if data+int64(n) > f.Data {
			return refuse(f.Path, "more data than the %d bytes announced", f.Data)
		}
		if err := copyExtent(ctx, out, r, h, int64(off), int64(n), buf); err != nil {
			return refuse(f.Path, "%v", err)
		}
		next, data = int64(off+n), data+int64(n)
	}
	var sum [sha256.Size]byte
	if _, err := io.ReadFull(r, sum[:]); err != nil {
		return refuse(f.Path, "digest cut short: %v", err)
	}
	if data != f.Data {
		return refuse(f.Path, "%d bytes of data arrived, %d were announced", data, f.Data)
	}
	if subtle.ConstantTimeCompare(sum[:], h.Sum(nil)) != 1 {
		return refuse(f.Path, "its SHA-256 does not match: the data changed on the way")
	}
	if err := out.Truncate(f.Size); err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return err
	}
	return out.Close()
}

func copyExtent(ctx context.Context, out *os.File, r io.Reader, h hash.Hash, off, n int64, buf []byte) error {
	for done := int64(0); done < n; {
		if err := ctx.Err(); err != nil {
			return err
		}
		k := min(int64(len(buf)), n-done)
		if _, err := io.ReadFull(r, buf[:k]); err != nil {
			return fmt.Errorf("cut short: %w", err)
		}
		h.Write(buf[:k])
		if _, err := out.WriteAt(buf[:k], off+done); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// SpaceError is a bundle larger than the free space where it would land.
type SpaceError struct {
	Dir        string
	Need, Free int64
}

func (e *SpaceError) Error() string {
	return fmt.Sprintf("the bundle needs %d bytes, and %s has %d free", e.Need, e.Dir, e.Free)
}

// Is makes a SpaceError a failed precondition.
func (e *SpaceError) Is(target error) bool { return target == errdefs.ErrFailedPrecondition }

// checkSpace refuses need bytes in dir when its file system has less free
// (with 1% and 64 MiB to spare).
func checkSpace(dir string, need int64) error {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return nil // cannot tell: the writes will say
	}
	free := int64(st.Bavail) * st.Bsize
	if need+need/100+64<<20 > free {
		return &SpaceError{Dir: dir, Need: need, Free: free}
	}
	return nil
}

// CheckSpace is checkSpace for a pre-flight: need bytes would arrive in
// parent (created if missing).
func CheckSpace(parent string, need int64) error {
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return err
	}
	return checkSpace(parent, need)
}
