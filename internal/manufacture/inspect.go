package manufacture

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"vtpm/internal/libtpms"
)

// EKInfo is an endorsement key found in a TPM.
type EKInfo struct {
	Name      string
	Handle    tpm2.TPMHandle
	Public    crypto.PublicKey
	CertIndex tpm2.TPMHandle
	Cert      *x509.Certificate // nil when the index is absent
	CertDER   []byte
	Locked    bool // the certificate index is write-locked
}

// Info is what Inspect finds in a TPM.
type Info struct {
	EKs          []EKInfo
	PlatformCert *x509.Certificate
	Available    []string // PCR banks implemented
	PCRBanks     []string // PCR banks active
}

var knownEKs = []struct {
	name          string
	handle, index tpm2.TPMHandle
}{
	{"RSA 2048", HandleEKRSA, IndexEKCertRSA},
	{"ECC P-256", HandleEKECC256, IndexEKCert256},
	{"ECC P-384", HandleEKECC384, IndexEKCert384},
}

// Read reports the EKs at the standard handles, their certificates, the
// platform certificate and the PCR banks of a running TPM.
func Read(t transport.TPM) (*Info, error) {
	info := &Info{}
	for _, k := range knownEKs {
		rp, err := tpm2.ReadPublic{ObjectHandle: k.handle}.Execute(t)
		if isHandleMissing(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read the %s EK at %#x: %w", k.name, uint32(k.handle), err)
		}
		pub, err := rp.OutPublic.Contents()
		if err != nil {
			return nil, err
		}
		ek := EKInfo{Name: k.name, Handle: k.handle, CertIndex: k.index}
		if ek.Public, err = tpm2.Pub(*pub); err != nil {
			return nil, err
		}
		if ek.CertDER, ek.Locked, err = ReadNV(t, k.index); err != nil && !isHandleMissing(err) {
			return nil, fmt.Errorf("read the %s EK certificate: %w", k.name, err)
		}
		if ek.CertDER != nil {
			if ek.Cert, err = x509.ParseCertificate(ek.CertDER); err != nil {
				return nil, fmt.Errorf("the %s EK certificate in NV %#x does not parse: %w", k.name, uint32(k.index), err)
			}
		}
		info.EKs = append(info.EKs, ek)
	}
	der, _, err := ReadNV(t, IndexPlatform)
	if err != nil && !isHandleMissing(err) {
		return nil, fmt.Errorf("read the platform certificate: %w", err)
	}
	if der != nil {
		if info.PlatformCert, err = x509.ParseCertificate(der); err != nil {
			return nil, fmt.Errorf("the platform certificate in NV %#x does not parse: %w", uint32(IndexPlatform), err)
		}
	}
	if info.Available, info.PCRBanks, err = Banks(t); err != nil {
		return nil, err
	}
	return info, nil
}

// ReadNV reads a whole NV index with owner authorization (empty) and reports
// whether it is write-locked.
func ReadNV(t transport.TPM, index tpm2.TPMHandle) (data []byte, locked bool, err error) {
	rp, err := tpm2.NVReadPublic{NVIndex: index}.Execute(t)
	if err != nil {
		return nil, false, err
	}
	pub, err := rp.NVPublic.Contents()
	if err != nil {
		return nil, false, err
	}
	nv := tpm2.NamedHandle{Handle: index, Name: rp.NVName}
	for off := 0; off < int(pub.DataSize); off += nvChunk {
		n := min(nvChunk, int(pub.DataSize)-off)
		r, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    nv,
			Size:       uint16(n),
			Offset:     uint16(off),
		}.Execute(t)
		if err != nil {
			return nil, false, fmt.Errorf("TPM2_NV_Read %#x at %d: %w", uint32(index), off, err)
		}
		data = append(data, r.Data.Buffer...)
	}
	return data, pub.Attributes.WriteLocked, nil
}

func isHandleMissing(err error) bool {
	return errors.Is(err, tpm2.TPMRCHandle)
}

// readOnly drops libtpms' writes, so that inspecting a TPM leaves its state
// exactly as it was.
type readOnly struct{ libtpms.Storage }

func (readOnly) Store(string, []byte) error { return nil }
func (readOnly) Delete(string, bool) error  { return nil }

// Inspect starts the TPM whose state st holds, reads it, and stops it
// without writing anything back.
func Inspect(st libtpms.Storage) (*Info, error) {
	tpm, err := libtpms.Open(readOnly{st})
	if err != nil {
		return nil, err
	}
	defer tpm.Close()
	if err := start(tpm); err != nil {
		return nil, err
	}
	defer tpm.Terminate()
	return Read(tpm)
}
