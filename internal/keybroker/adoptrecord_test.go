package keybroker

import (
	"bytes"
	"testing"

	"github.com/google/uuid"

	"vtpm/internal/swtpm/statefile"
)

// An adoption record round-trips through a migration blob and verifies
// only under the key it was made with, over the blob it was made for.
func TestAdoptRecord(t *testing.T) {
	migKey := bytes.Repeat([]byte{7}, 32)
	blob, _, err := statefile.EncodeMigration([]byte("permanent state"), nil, &statefile.Key{Bytes: migKey}, false)
	if err != nil {
		t.Fatal(err)
	}
	in := &AdoptRecord{TPM: uuid.New(), Protector: []byte(`{"v":1}`), Generations: map[string]uint64{"permall": 42}}
	ext, err := AppendAdoptRecord(blob, in, migKey)
	if err != nil {
		t.Fatal(err)
	}
	rest, rec, err := ParseAdoptRecord(ext)
	if err != nil || rec == nil {
		t.Fatalf("ParseAdoptRecord = %v, %v", rec, err)
	}
	if !bytes.Equal(rest, blob) || rec.TPM != in.TPM || string(rec.Protector) != string(in.Protector) || rec.Generations["permall"] != 42 {
		t.Errorf("round trip: %+v, rest %x; want %+v, %x", rec, rest, in, blob)
	}
	if !rec.Verify(migKey) {
		t.Error("the record does not verify under its key")
	}
	if rec.Verify(bytes.Repeat([]byte{8}, 32)) {
		t.Error("the record verifies under another key")
	}
	tampered := bytes.Clone(ext)
	tampered[len(blob)-1] ^= 1
	if _, rec, err := ParseAdoptRecord(tampered); err != nil || rec == nil || rec.Verify(migKey) {
		t.Errorf("a blob changed under the record: %v, %v; want it parsed and refused", rec, err)
	}
	if rest, rec, err := ParseAdoptRecord(blob); err != nil || rec != nil || !bytes.Equal(rest, blob) {
		t.Errorf("a blob without a record: %v, %v", rec, err)
	}
	if _, err := rec.ParsedProtector(); err == nil {
		t.Error("a protector that does not parse was accepted")
	}
}
