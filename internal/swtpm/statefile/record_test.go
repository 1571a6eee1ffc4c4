package statefile

import (
	"bytes"
	"testing"
)

func TestRecordRoundTrip(t *testing.T) {
	migKey := &Key{Bytes: bytes.Repeat([]byte{7}, 32)}
	plain := []byte("permanent state")
	for _, tc := range []struct {
		name string
		key  *Key
	}{{"plain", nil}, {"migration key", migKey}} {
		t.Run(tc.name, func(t *testing.T) {
			blob, flags, err := EncodeMigration(plain, nil, tc.key, false)
			if err != nil {
				t.Fatal(err)
			}
			ext, err := AppendRecord(blob, TagVTPM, []byte("identity"))
			if err != nil {
				t.Fatal(err)
			}
			// A decoder that does not know the record still reads the blob.
			got, err := DecodeMigration(ext, flags, nil, tc.key)
			if err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("DecodeMigration with a record = %q, %v; want %q", got, err, plain)
			}
			rest, value, ok := CutRecord(ext, TagVTPM)
			if !ok || !bytes.Equal(rest, blob) || string(value) != "identity" {
				t.Fatalf("CutRecord = %x, %q, %v; want the original blob and the record", rest, value, ok)
			}
			if _, _, ok := CutRecord(blob, TagVTPM); ok {
				t.Error("CutRecord found a record in a blob without one")
			}
			if _, _, ok := CutRecord(ext[:len(ext)-1], TagVTPM); ok {
				t.Error("CutRecord accepted a truncated blob")
			}
		})
	}
}
