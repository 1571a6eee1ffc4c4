package keystore

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/uuid"
)

func TestProtectorVersion(t *testing.T) {
	a, b := uuid.New(), uuid.New()
	type rec struct {
		id      uuid.UUID
		version uint64
		blob    uint64 // a permall generation recorded before it, when not 0
	}
	tests := []struct {
		name    string
		records []rec
		want    map[uuid.UUID]uint64
		blobs   map[uuid.UUID]uint64 // permall generations afterwards
		noFile  bool                 // no record file is created
	}{
		{"unknown TPM is 0", nil, map[uuid.UUID]uint64{a: 0}, nil, true},
		{"version 0 writes nothing", []rec{{a, 0, 0}}, map[uuid.UUID]uint64{a: 0}, nil, true},
		{"grows", []rec{{a, 1, 0}, {a, 2, 0}, {a, 5, 0}}, map[uuid.UUID]uint64{a: 5}, nil, false},
		{"never lowers", []rec{{a, 5, 0}, {a, 3, 0}}, map[uuid.UUID]uint64{a: 5}, nil, false},
		{"TPMs are independent", []rec{{a, 4, 0}, {b, 9, 0}}, map[uuid.UUID]uint64{a: 4, b: 9}, nil, false},
		{"beside the state generations", []rec{{a, 3, 7}}, map[uuid.UUID]uint64{a: 3}, map[uuid.UUID]uint64{a: 7}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ks")
			g := openFile(t, dir).Generations()
			for _, r := range tt.records {
				if r.blob != 0 {
					if err := g.Record(r.id, "permall", r.blob); err != nil {
						t.Fatal(err)
					}
				}
				if err := g.RecordProtectorVersion(r.id, r.version); err != nil {
					t.Fatalf("RecordProtectorVersion(%d): %v", r.version, err)
				}
			}
			g2 := openFile(t, dir).Generations()
			for id, want := range tt.want {
				if got, err := g2.ProtectorVersion(id); err != nil || got != want {
					t.Errorf("ProtectorVersion = %d, %v; want %d", got, err, want)
				}
			}
			for id, want := range tt.blobs {
				if got, err := g2.Last(id, "permall"); err != nil || got != want {
					t.Errorf("Last(permall) = %d, %v; want %d: the protector version disturbed the state generations", got, err, want)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, genKind, a.String())); tt.noFile != os.IsNotExist(err) {
				t.Errorf("record file of TPM %s: %v; want it to exist: %v", a, err, !tt.noFile)
			}
		})
	}
}
