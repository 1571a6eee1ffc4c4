// Package manufacture makes a fresh vTPM leave the factory like a real TPM:
// endorsement keys at their standard persistent handles, EK certificates and a
// platform certificate in the standard NV indices (issued by this host's local
// CA), the chosen PCR banks, and NV locked. It drives libtpms in-process with
// go-tpm's typed commands; no external tool is involved.
package manufacture

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Standard handles and NV indices (TCG EK Credential Profile 2.0 and the
// Provisioning Guidance; P-384 as swtpm 0.7.1 uses them).
const (
	HandleEKRSA      tpm2.TPMHandle = 0x81010001
	HandleEKECC256   tpm2.TPMHandle = 0x81010002
	HandleEKECC384   tpm2.TPMHandle = 0x81010016
	HandleSPK        tpm2.TPMHandle = 0x81000001
	IndexEKCertRSA   tpm2.TPMHandle = 0x01c00002
	IndexEKCert256   tpm2.TPMHandle = 0x01c0000a
	IndexEKCert384   tpm2.TPMHandle = 0x01c00016
	IndexPlatform    tpm2.TPMHandle = 0x01c08000
	nvChunk                         = 1024 // bytes per TPM2_NV_Write, as swtpm_setup
	pcrCount                        = 24
	certNVAttributes uint32         = 0x42072001
)

// Curve selects the ECC EK.
type Curve string

// ECC EK curves. The TCG EK profile's default is P-256; swtpm 0.7.1 makes P-384.
const (
	NoECC Curve = ""
	P256  Curve = "P256"
	P384  Curve = "P384"
)

// ParseCurve accepts "", "none", "p256", "p-256", "secp256r1", "p384", … .
func ParseCurve(s string) (Curve, error) {
	switch strings.ToLower(strings.ReplaceAll(s, "-", "")) {
	case "", "none":
		return NoECC, nil
	case "p256", "secp256r1", "nistp256":
		return P256, nil
	case "p384", "secp384r1", "nistp384":
		return P384, nil
	}
	return NoECC, fmt.Errorf("ECC curve %q: want p256 or p384 (or none)", s)
}

// Options say what to manufacture.
type Options struct {
	RSA          bool  // RSA-2048 EK at 0x81010001
	ECC          Curve // ECC EK: P-256 at 0x81010002, or P-384 at 0x81010016
	EKCerts      bool  // EK certificates in NV (needs CA)
	PlatformCert bool  // platform certificate at 0x01c08000 (needs CA and an EK)
	Lock         bool  // NV_WriteLock the certificate indices
	// SPK creates a storage primary key at 0x81000001 (swtpm_setup
	// --create-spk): "rsa" (RSA-2048) or "ecc" (P-256); "" creates none.
	SPK string
	// PCRBanks are the banks to leave active ("sha1", "sha256", …); nil
	// leaves the TPM's banks as they are.
	PCRBanks []string
	Identity Identity // TPM UUID, VM name, platform attributes; TPM fields are filled in
	CA       Issuer
	Now      time.Time // certificate NotBefore; zero means now
}

// EK is one endorsement key made by Provision.
type EK struct {
	Name      string // "RSA 2048", "ECC P-256", "ECC P-384"
	Handle    tpm2.TPMHandle
	Public    crypto.PublicKey
	CertIndex tpm2.TPMHandle
	Cert      []byte // DER; nil without EKCerts
}

// Report says what was made.
type Report struct {
	EKs          []EK
	PlatformCert []byte
	PCRBanks     []string // active after manufacture
	Available    []string // banks the TPM implements
}

// Validate checks the options for contradictions.
func (o *Options) Validate() error {
	if (o.EKCerts || o.PlatformCert) && o.CA == nil {
		return errors.New("certificates need the local CA; load it with LoadCA")
	}
	if o.PlatformCert && !o.RSA && o.ECC == NoECC {
		return errors.New("a platform certificate is bound to an EK: create an RSA or ECC EK too")
	}
	if (o.EKCerts || o.PlatformCert) && !o.RSA && o.ECC == NoECC {
		return errors.New("EK certificates need an EK: create an RSA or ECC EK too")
	}
	for _, b := range o.PCRBanks {
		if _, ok := bankAlgs[b]; !ok {
			return fmt.Errorf("PCR bank %q: want one of sha1, sha256, sha384, sha512", b)
		}
	}
	if o.SPK != "" && o.SPK != "rsa" && o.SPK != "ecc" {
		return fmt.Errorf("storage primary key %q: want rsa or ecc", o.SPK)
	}
	if o.PCRBanks != nil && len(o.PCRBanks) == 0 {
		return errors.New("no PCR banks selected; give at least one (e.g. sha256)")
	}
	return nil
}

// Provision creates the EKs and writes the certificates into a running TPM
// (after TPM2_Startup) that has platform authorization (empty auth, as a
// fresh TPM). PCR banks are not touched: see AllocatePCRs.
func Provision(t transport.TPM, o Options) (*Report, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	now := o.Now
	if now.IsZero() {
		now = time.Now()
	}
	id := o.Identity
	if err := fillTPMIdentity(t, &id); err != nil {
		return nil, err
	}
	rep := &Report{}
	if o.SPK != "" {
		tmpl := tpm2.RSASRKTemplate
		if o.SPK == "ecc" {
			tmpl = tpm2.ECCSRKTemplate
		}
		if _, err := createPersistent(t, tpm2.TPMRHOwner, tmpl, HandleSPK); err != nil {
			return nil, fmt.Errorf("create the storage primary key: %w", err)
		}
	}
	type ekSpec struct {
		name      string
		tmpl      tpm2.TPMTPublic
		handle    tpm2.TPMHandle
		certIndex tpm2.TPMHandle
	}
	var specs []ekSpec
	if o.RSA {
		specs = append(specs, ekSpec{"RSA 2048", tpm2.RSAEKTemplate, HandleEKRSA, IndexEKCertRSA})
	}
	switch o.ECC {
	case P256:
		specs = append(specs, ekSpec{"ECC P-256", tpm2.ECCEKTemplate, HandleEKECC256, IndexEKCert256})
	case P384:
		specs = append(specs, ekSpec{"ECC P-384", ECCP384EKTemplate, HandleEKECC384, IndexEKCert384})
	}
	for _, s := range specs {
		pub, err := createPersistent(t, tpm2.TPMRHEndorsement, s.tmpl, s.handle)
		if err != nil {
			return nil, fmt.Errorf("create the %s EK: %w", s.name, err)
		}
		ek := EK{Name: s.name, Handle: s.handle, Public: pub, CertIndex: s.certIndex}
		if o.EKCerts {
			if ek.Cert, err = o.CA.EKCertificate(pub, id, now); err != nil {
				return nil, err
			}
			if err := writeNV(t, s.certIndex, ek.Cert, o.Lock); err != nil {
				return nil, fmt.Errorf("write the %s EK certificate to NV %#x: %w", s.name, uint32(s.certIndex), err)
			}
		}
		rep.EKs = append(rep.EKs, ek)
	}
	if o.PlatformCert {
		var err error
		if rep.PlatformCert, err = o.CA.PlatformCertificate(rep.EKs[0].Public, id, now); err != nil {
			return nil, err
		}
		if err := writeNV(t, IndexPlatform, rep.PlatformCert, o.Lock); err != nil {
			return nil, fmt.Errorf("write the platform certificate to NV %#x: %w", uint32(IndexPlatform), err)
		}
	}
	return rep, nil
}

// ECCP384EKTemplate is the EK template swtpm 0.7.1 uses for its P-384 EK
// (TCG EK profile template H-4 with the decrypt attributes): sha384, policy
// B, AES-256-CFB, userWithAuth, an empty unique field.
var ECCP384EKTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA384,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		AdminWithPolicy:     true,
		Restricted:          true,
		Decrypt:             true,
	},
	AuthPolicy: tpm2.TPM2BDigest{Buffer: []byte{
		0xB2, 0x6E, 0x7D, 0x28, 0xD1, 0x1A, 0x50, 0xBC, 0x53, 0xD8, 0x82, 0xBC,
		0xF5, 0xFD, 0x3A, 0x1A, 0x07, 0x41, 0x48, 0xBB, 0x35, 0xD3, 0xB4, 0xE4,
		0xCB, 0x1C, 0x0A, 0xD9, 0xBD, 0xE4, 0x19, 0xCA, 0xCB, 0x47, 0xBA, 0x09,
		0x69, 0x96, 0x46, 0x15, 0x0F, 0x9F, 0xC0, 0x00, 0xF3, 0xF8, 0x0E, 0x12,
	}},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Symmetric: tpm2.TPMTSymDefObject{
			Algorithm: tpm2.TPMAlgAES,
			KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256)),
			Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
		},
		CurveID: tpm2.TPMECCNistP384,
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

// createPersistent creates a primary key in hierarchy and makes it persistent at handle.
func createPersistent(t transport.TPM, hierarchy tpm2.TPMHandle, tmpl tpm2.TPMTPublic, handle tpm2.TPMHandle) (crypto.PublicKey, error) {
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: hierarchy,
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("TPM2_CreatePrimary: %w", err)
	}
	defer tpm2.FlushContext{FlushHandle: cp.ObjectHandle}.Execute(t)
	if _, err := (tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     &tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: handle,
	}).Execute(t); err != nil {
		return nil, fmt.Errorf("TPM2_EvictControl to %#x: %w (is the TPM already manufactured? use a fresh state directory or overwrite it)", uint32(handle), err)
	}
	pub, err := cp.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	return tpm2.Pub(*pub)
}

// certNVPublic is an NV index with swtpm_setup's attributes for certificates:
// PPWRITE|WRITEDEFINE|PPREAD|OWNERREAD|AUTHREAD|NO_DA|PLATFORMCREATE.
func certNVPublic(index tpm2.TPMHandle, size int) tpm2.TPMSNVPublic {
	return tpm2.TPMSNVPublic{
		NVIndex: index,
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			PPWrite:        true,
			WriteDefine:    true,
			PPRead:         true,
			OwnerRead:      true,
			AuthRead:       true,
			NoDA:           true,
			PlatformCreate: true,
		},
		DataSize: uint16(size),
	}
}

func writeNV(t transport.TPM, index tpm2.TPMHandle, data []byte, lock bool) error {
	pub := certNVPublic(index, len(data))
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHPlatform,
		PublicInfo: tpm2.New2B(pub),
	}).Execute(t); err != nil {
		return fmt.Errorf("TPM2_NV_DefineSpace: %w", err)
	}
	name, err := tpm2.NVName(&pub)
	if err != nil {
		return err
	}
	nv := tpm2.NamedHandle{Handle: index, Name: *name}
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	for off := 0; off < len(data); off += nvChunk {
		end := min(off+nvChunk, len(data))
		if _, err := (tpm2.NVWrite{
			AuthHandle: platform,
			NVIndex:    nv,
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data[off:end]},
			Offset:     uint16(off),
		}).Execute(t); err != nil {
			return fmt.Errorf("TPM2_NV_Write at offset %d: %w", off, err)
		}
	}
	if lock {
		if _, err := (tpm2.NVWriteLock{AuthHandle: platform, NVIndex: nv}).Execute(t); err != nil {
			return fmt.Errorf("TPM2_NV_WriteLock: %w", err)
		}
	}
	return nil
}

// fillTPMIdentity fills the TPM fields of id that are empty: vtpm as
// manufacturer and model, the TPM's firmware version and specification.
func fillTPMIdentity(t transport.TPM, id *Identity) error {
	props, err := fixedProperties(t)
	if err != nil {
		return err
	}
	if id.Manufacturer == "" {
		id.Manufacturer = VTPMManufacturer
	}
	if id.Model == "" {
		id.Model = VTPMModel
	}
	if id.Version == "" {
		id.Version = fmt.Sprintf("id:%08X", props[tpm2.TPMPTFirmwareVersion1])
	}
	if id.SpecFamily == "" {
		f := props[tpm2.TPMPTFamilyIndicator]
		id.SpecFamily = strings.TrimRight(string([]byte{byte(f >> 24), byte(f >> 16), byte(f >> 8), byte(f)}), "\x00")
		id.SpecLevel = int(props[tpm2.TPMPTLevel])
		id.SpecRevision = int(props[tpm2.TPMPTRevision])
	}
	if id.PlatformManufacturer == "" {
		id.PlatformManufacturer = DefaultPlatformManufacturer
	}
	if id.PlatformModel == "" {
		id.PlatformModel = DefaultPlatformModel
	}
	if id.PlatformVersion == "" {
		id.PlatformVersion = DefaultPlatformVersion
	}
	return nil
}

func fixedProperties(t transport.TPM) (map[tpm2.TPMPT]uint32, error) {
	props := map[tpm2.TPMPT]uint32{}
	next := uint32(tpm2.TPMPTFamilyIndicator)
	for {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: next, PropertyCount: 64}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("TPM2_GetCapability(properties): %w", err)
		}
		tp, err := rsp.CapabilityData.Data.TPMProperties()
		if err != nil {
			return nil, err
		}
		for _, p := range tp.TPMProperty {
			props[p.Property] = p.Value
			next = uint32(p.Property) + 1
		}
		if !rsp.MoreData || len(tp.TPMProperty) == 0 || next >= uint32(tpm2.TPMPTFamilyIndicator)+0x100 {
			return props, nil
		}
	}
}

var bankAlgs = map[string]tpm2.TPMAlgID{
	"sha1":   tpm2.TPMAlgSHA1,
	"sha256": tpm2.TPMAlgSHA256,
	"sha384": tpm2.TPMAlgSHA384,
	"sha512": tpm2.TPMAlgSHA512,
}

func bankName(a tpm2.TPMAlgID) string {
	for n, b := range bankAlgs {
		if b == a {
			return n
		}
	}
	return fmt.Sprintf("alg-%#x", uint16(a))
}

// Banks returns the PCR banks the TPM implements and those that are active
// (at least one PCR selected), in the TPM's order.
func Banks(t transport.TPM) (available, active []string, err error) {
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 1}.Execute(t)
	if err != nil {
		return nil, nil, fmt.Errorf("TPM2_GetCapability(PCRs): %w", err)
	}
	sel, err := rsp.CapabilityData.Data.AssignedPCR()
	if err != nil {
		return nil, nil, err
	}
	for _, s := range sel.PCRSelections {
		available = append(available, bankName(s.Hash))
		if slices.ContainsFunc(s.PCRSelect, func(b byte) bool { return b != 0 }) {
			active = append(active, bankName(s.Hash))
		}
	}
	return available, active, nil
}

// AllocatePCRs asks the TPM to activate exactly banks (all 24 PCRs each) and
// deactivate its other banks. It takes effect at the next TPM reset.
func AllocatePCRs(t transport.TPM, banks []string) (available []string, err error) {
	available, _, err = Banks(t)
	if err != nil {
		return nil, err
	}
	var sel tpm2.TPMLPCRSelection
	any := false
	for _, a := range available {
		bits := make([]byte, pcrCount/8)
		if slices.Contains(banks, a) {
			for i := range bits {
				bits[i] = 0xff
			}
			any = true
		}
		sel.PCRSelections = append(sel.PCRSelections, tpm2.TPMSPCRSelection{Hash: bankAlgs[a], PCRSelect: bits})
	}
	if !any {
		return available, fmt.Errorf("none of the PCR banks %s is implemented by this TPM (it has %s)", strings.Join(banks, ","), strings.Join(available, ","))
	}
	ok, err := pcrAllocate(t, sel)
	if err != nil {
		return available, err
	}
	if !ok {
		return available, fmt.Errorf("TPM2_PCR_Allocate of %s did not succeed", strings.Join(banks, ","))
	}
	return available, nil
}

// PublicKeyEqual reports whether two EK public keys are the same key.
func PublicKeyEqual(a, b crypto.PublicKey) bool {
	switch a := a.(type) {
	case *rsa.PublicKey:
		return a.Equal(b)
	case *ecdsa.PublicKey:
		return a.Equal(b)
	}
	return false
}

// pcrAllocate runs TPM2_PCR_Allocate with empty platform authorization.
// go-tpm's tpm2 package has no typed command for it, so it is built here from
// go-tpm's marshalling of the selection.
func pcrAllocate(t transport.TPM, sel tpm2.TPMLPCRSelection) (bool, error) {
	params := tpm2.Marshal(sel)
	cmd := binary.BigEndian.AppendUint16(nil, uint16(tpm2.TPMSTSessions))
	cmd = binary.BigEndian.AppendUint32(cmd, 0) // size, below
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMCCPCRAllocate))
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMRHPlatform))
	cmd = binary.BigEndian.AppendUint32(cmd, 9) // one password session, empty
	cmd = append(cmd, 0x40, 0x00, 0x00, 0x09, 0, 0, 0, 0, 0)
	cmd = append(cmd, params...)
	binary.BigEndian.PutUint32(cmd[2:], uint32(len(cmd)))
	rsp, err := t.Send(cmd)
	if err != nil {
		return false, fmt.Errorf("TPM2_PCR_Allocate: %w", err)
	}
	if len(rsp) < 10 {
		return false, fmt.Errorf("TPM2_PCR_Allocate: short response (%d bytes)", len(rsp))
	}
	if rc := tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:])); rc != tpm2.TPMRCSuccess {
		return false, fmt.Errorf("TPM2_PCR_Allocate: %w", rc)
	}
	if len(rsp) < 15 {
		return false, fmt.Errorf("TPM2_PCR_Allocate: short response (%d bytes)", len(rsp))
	}
	return rsp[14] != 0, nil // after the header and parameterSize: allocationSuccess
}

// KnownBank reports whether name is a PCR bank this package can allocate.
func KnownBank(name string) bool {
	_, ok := bankAlgs[name]
	return ok
}
