package statefile

import (
	"bytes"
	"fmt"

	"vtpm/internal/tpmrc"
)

// StateFlagEncrypted is PTM_STATE_FLAG_ENCRYPTED on the control channel:
// the inner layer of a migration blob is still under the file key.
const StateFlagEncrypted uint32 = 0x02

// EncodeMigration wraps plain into the blob that GET_STATEBLOB returns.
// Unless decrypted is set, the inner layer is encrypted with fileKey when
// one is configured; the outer layer is encrypted with migKey when one is
// configured. stateFlags is the state_flags value for the response.
//
// Unlike swtpm 0.7.1, each layer gets an IV as long as its own key.
func EncodeMigration(plain []byte, fileKey, migKey *Key, decrypted bool) (blob []byte, stateFlags uint32, err error) {
	flags := FlagMigrationData
	var inner []byte
	if fileKey != nil && !decrypted {
		if inner, err = encryptTLVs(plain, fileKey, tagEncryptedData, tagIVEncryptedData); err != nil {
			return nil, 0, fmt.Errorf("encrypting migration blob with the state key: %w", err)
		}
		flags |= FlagEncrypted
		if fileKey.is256() {
			flags |= FlagEncrypted256
		}
		stateFlags = StateFlagEncrypted
	} else {
		inner = appendTLV(nil, tagData, plain)
	}

	var outer []byte
	if migKey != nil {
		if outer, err = encryptTLVs(inner, migKey, tagEncryptedMigrationData, tagIVEncryptedMigrationData); err != nil {
			return nil, 0, fmt.Errorf("encrypting migration blob with the migration key: %w", err)
		}
		flags |= FlagMigrationEncrypted
		if migKey.is256() {
			flags |= FlagMigration256
		}
	} else {
		outer = appendTLV(nil, tagMigrationData, inner)
	}
	blob = appendHeader(make([]byte, 0, headerSize+len(outer)), flags, len(outer))
	return append(blob, outer...), stateFlags, nil
}

// DecodeMigration unwraps a SET_STATEBLOB payload into libtpms state. A nil
// result with a nil error means "no state" (an empty blob or a bare
// header), which clears any state set before.
//
// A migration-encrypted blob needs migKey (else tpmrc.TPMKeyNotFound); a plain
// one is accepted even when migKey is set. The inner layer is decrypted with
// fileKey when the header says so or stateFlags has StateFlagEncrypted.
func DecodeMigration(blob []byte, stateFlags uint32, fileKey, migKey *Key) ([]byte, error) {
	if len(blob) == 0 {
		return nil, nil
	}
	h, payload, err := parseHeader(blob)
	if err != nil {
		return nil, fmt.Errorf("decoding migration blob: %w", err)
	}
	if len(payload) == 0 {
		return nil, nil
	}

	if h.version == 1 {
		return decodeMigrationV1(payload, h, stateFlags, fileKey, migKey)
	}
	var inner []byte
	if h.flags&FlagMigrationEncrypted != 0 {
		if migKey == nil {
			return nil, fmt.Errorf("decoding migration blob: it is encrypted with a migration key but none is configured; pass the source's --migration-key: %w", tpmrc.TPMKeyNotFound)
		}
		if inner, err = decodeLayer(payload, h, migKey, tagMigrationData, tagEncryptedMigrationData, tagIVEncryptedMigrationData, FlagMigration256); err != nil {
			return nil, fmt.Errorf("decoding migration blob's outer layer: %w", err)
		}
	} else {
		v, ok := findTLV(payload, tagMigrationData)
		if !ok {
			return nil, fmt.Errorf("decoding migration blob: no migration data record; is this a state file rather than a migration blob?: %w", tpmrc.TPMFail)
		}
		inner = v
	}

	if h.flags&FlagEncrypted != 0 || stateFlags&StateFlagEncrypted != 0 {
		if fileKey == nil {
			return nil, fmt.Errorf("decoding migration blob: its inner layer is encrypted with a state key but none is configured; pass the source's --key: %w", tpmrc.TPMKeyNotFound)
		}
		plain, err := decodeLayer(inner, h, fileKey, tagData, tagEncryptedData, tagIVEncryptedData, FlagEncrypted256)
		if err != nil {
			return nil, fmt.Errorf("decoding migration blob's inner layer: %w", err)
		}
		return plain, nil
	}
	plain, ok := findTLV(inner, tagData)
	if !ok {
		return nil, fmt.Errorf("decoding migration blob: no plain data record in the inner layer: %w", tpmrc.TPMFail)
	}
	return bytes.Clone(plain), nil
}

// decodeMigrationV1 reads a blob of header version 1, which swtpm still
// accepts: each layer is the whole payload, raw or (with its key)
// AES-CBC(zero IV) of SHA256(data)||data, with no records.
func decodeMigrationV1(payload []byte, h header, stateFlags uint32, fileKey, migKey *Key) ([]byte, error) {
	inner := payload
	if h.flags&FlagMigrationEncrypted != 0 {
		if migKey == nil {
			return nil, fmt.Errorf("decoding migration blob: it is encrypted with a migration key but none is configured; pass the source's --migration-key: %w", tpmrc.TPMKeyNotFound)
		}
		var err error
		if inner, err = decodeV1(payload, migKey); err != nil {
			return nil, fmt.Errorf("decoding migration blob's outer layer: %w", err)
		}
	}
	if h.flags&FlagEncrypted != 0 || stateFlags&StateFlagEncrypted != 0 {
		if fileKey == nil {
			return nil, fmt.Errorf("decoding migration blob: its inner layer is encrypted with a state key but none is configured; pass the source's --key: %w", tpmrc.TPMKeyNotFound)
		}
		plain, err := decodeV1(inner, fileKey)
		if err != nil {
			return nil, fmt.Errorf("decoding migration blob's inner layer: %w", err)
		}
		return plain, nil
	}
	return bytes.Clone(inner), nil
}
