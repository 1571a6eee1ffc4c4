package seal

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

// Generations remembers the last generation seen of each blob of each TPM.
// It must live outside the state directory: whoever can put back an old
// copy of the directory must not be able to put back this record too.
type Generations interface {
	// Last returns the last generation recorded, or 0 if none.
	Last(id uuid.UUID, name string) (uint64, error)
	// Record notes gen as seen. The stored value never decreases.
	Record(id uuid.UUID, name string, gen uint64) error
}

// FileGenerations keeps one small JSON file per TPM in a directory.
type FileGenerations struct {
	dir string
	mu  sync.Mutex
}

// NewFileGenerations returns a Generations kept in dir (created on first
// Record with mode 0700).
func NewFileGenerations(dir string) *FileGenerations {
	return &FileGenerations{dir: dir}
}

type generationsFile struct {
	UUID        string            `json:"uuid"`
	Generations map[string]uint64 `json:"generations"`
}

func (g *FileGenerations) path(id uuid.UUID) string {
	return filepath.Join(g.dir, id.String()+".json")
}

func (g *FileGenerations) read(id uuid.UUID) (map[string]uint64, error) {
	p := g.path(id)
	data, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]uint64{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read generation record %s: %w", p, err)
	}
	var f generationsFile
	if err := json.Unmarshal(data, &f); err != nil {
		// Never treat a damaged record as empty: that would disable rollback detection.
		return nil, errdefs.New(errdefs.ErrDataLoss, "generation record %s is damaged (%v)", p, err).
			With(errdefs.Advise("restore it from backup, or remove it to accept the current state as genuine"))
	}
	if f.UUID != id.String() {
		return nil, errdefs.New(errdefs.ErrDataLoss, "generation record %s is for TPM %s, not %s", p, f.UUID, id).
			With(errdefs.Advise("restore the right file"))
	}
	if f.Generations == nil {
		f.Generations = map[string]uint64{}
	}
	return f.Generations, nil
}

// Last implements Generations.
func (g *FileGenerations) Last(id uuid.UUID, name string) (uint64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	m, err := g.read(id)
	if err != nil {
		return 0, err
	}
	return m[name], nil
}

// Record implements Generations.
func (g *FileGenerations) Record(id uuid.UUID, name string, gen uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	m, err := g.read(id)
	if err != nil {
		return err
	}
	if gen <= m[name] {
		return nil
	}
	m[name] = gen
	data, err := json.MarshalIndent(generationsFile{UUID: id.String(), Generations: m}, "", "  ")
	if err != nil {
		return fmt.Errorf("encode generation record: %w", err)
	}
	if err := os.MkdirAll(g.dir, 0o700); err != nil {
		return fmt.Errorf("create generation record directory %s: %w", g.dir, err)
	}
	if err := writeFileAtomic(g.path(id), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("record generation %d of %s for TPM %s: %w", gen, name, id, err)
	}
	return nil
}
