package keystore

import (
	"encoding/json"
	"errors"
	"fmt"
)

// SealToHostTPM seals secret (up to 128 bytes) to the host TPM named by
// spec (as Options.HostTPM; "" is DefaultHostTPM) under its SRK, for a
// service's own key kept beside its data (the key service's service
// key). The result is JSON in the form of the keystore's sealed master key
// and opens only with UnsealFromHostTPM on the same TPM.
func SealToHostTPM(spec string, secret []byte) ([]byte, error) {
	if spec == "" {
		spec = DefaultHostTPM
	}
	t, err := openHostTPM(spec)
	if err != nil {
		return nil, err
	}
	defer closeTPM(t)
	sk, err := sealToTPM(t, secret)
	if err != nil {
		return nil, fmt.Errorf("seal to the host TPM at %s: %w", spec, err)
	}
	return json.MarshalIndent(masterTPM{Format: 1, HostTPM: spec, SRKName: sk.srkName, Public: sk.public, Private: sk.private}, "", "  ")
}

// UnsealFromHostTPM opens what SealToHostTPM sealed, with the host TPM
// named by spec ("" is the one it was sealed through). A TPM whose owner
// seed changed since fails with ErrHostTPMChanged; none at spec with
// ErrHostTPMMissing.
func UnsealFromHostTPM(spec string, sealed []byte) ([]byte, error) {
	var m masterTPM
	if err := json.Unmarshal(sealed, &m); err != nil || m.Format != 1 || len(m.SRKName) == 0 {
		return nil, errf(ErrCorrupt, err, "the sealed secret is damaged (not a sealed object of format 1)")
	}
	if spec == "" {
		spec = m.HostTPM
	}
	t, err := openHostTPM(spec)
	if err != nil {
		return nil, err
	}
	defer closeTPM(t)
	secret, _, err := unsealFromTPM(t, &sealedKey{public: m.Public, private: m.Private, srkName: m.SRKName})
	if errors.Is(err, errTPMChanged) {
		return nil, errf(ErrHostTPMChanged, err, "the secret is sealed to another TPM than the host TPM at %s (cleared or replaced): %v", spec, err)
	}
	if err != nil {
		return nil, fmt.Errorf("unseal with the host TPM at %s: %w", spec, err)
	}
	return secret, nil
}
