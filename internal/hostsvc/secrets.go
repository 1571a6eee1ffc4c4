package hostsvc

import (
	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
	"vtpm/internal/secret"
)

// secretLen is the data key followed by the generation record's key.
const secretLen = guardian.DEKSize + 32

// secrets are the key bytes of an answer, in locked memory.
type secrets struct{ mem *secret.Bytes }

func newSecrets(key *keybroker.Key, recordKey []byte) (*secrets, error) {
	mem, err := secret.New(secretLen)
	if err != nil {
		return nil, err
	}
	err = key.HandOver(func(dek []byte) error {
		copy(mem.Bytes(), dek)
		return nil
	})
	if err != nil {
		mem.Close()
		return nil, err
	}
	copy(mem.Bytes()[guardian.DEKSize:], recordKey)
	return &secrets{mem: mem}, nil
}

func (s *secrets) bytes() []byte {
	if s == nil {
		return nil
	}
	return s.mem.Bytes()
}

func (s *secrets) close() {
	if s != nil {
		s.mem.Close()
	}
}
