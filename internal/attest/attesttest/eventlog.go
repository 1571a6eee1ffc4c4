package attesttest

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"math/big"
	"time"
	"unicode/utf16"
)

// Event types of the TCG PC Client Platform Firmware Profile.
const (
	evPostCode                   = 0x00000001
	evNoAction                   = 0x00000003
	evSeparator                  = 0x00000004
	evSCRTMVersion               = 0x00000008
	evEFIVariableDriverConfig    = 0x80000001
	evEFIVariableBoot            = 0x80000002
	evEFIBootServicesApplication = 0x80000003
	evEFIAction                  = 0x80000007
	evEFIVariableAuthority       = 0x800000E0
)

const algSHA256 = 0x000B // TPM_ALG_SHA256

// Event is one measurement: Digest is what was extended into PCR, Data what
// the log says about it.
type Event struct {
	PCR    int
	Type   uint32
	Digest [32]byte
	Data   []byte
}

// EncodeLog writes events as a TCG PC Client crypto-agile event log: the
// Spec ID event (in the SHA-1 log format, as firmware writes it) announcing
// SHA-256 only, then each event with its SHA-256 digest. Little-endian
// throughout.
func EncodeLog(events []Event) []byte {
	var b bytes.Buffer
	le := func(v any) { _ = binary.Write(&b, binary.LittleEndian, v) }

	// TCG_EfiSpecIDEvent.
	var spec bytes.Buffer
	spec.WriteString("Spec ID Event03\x00")
	_ = binary.Write(&spec, binary.LittleEndian, uint32(0)) // platformClass: client
	spec.Write([]byte{0, 2, 0, 2})                          // specVersionMinor, Major, errata, uintnSize (UINT64)
	_ = binary.Write(&spec, binary.LittleEndian, uint32(1)) // numberOfAlgorithms
	_ = binary.Write(&spec, binary.LittleEndian, uint16(algSHA256))
	_ = binary.Write(&spec, binary.LittleEndian, uint16(sha256.Size))
	spec.WriteByte(0) // vendorInfoSize

	// TCG_PCClientPCREvent: PCR 0, EV_NO_ACTION, a zero SHA-1 digest.
	le(uint32(0))
	le(uint32(evNoAction))
	b.Write(make([]byte, 20))
	le(uint32(spec.Len()))
	b.Write(spec.Bytes())

	// TCG_PCR_EVENT2.
	for _, e := range events {
		le(uint32(e.PCR))
		le(e.Type)
		le(uint32(1)) // TPML_DIGEST_VALUES.count
		le(uint16(algSHA256))
		b.Write(e.Digest[:])
		le(uint32(len(e.Data)))
		b.Write(e.Data)
	}
	return b.Bytes()
}

// efiGUID encodes a GUID as EFI_GUID: the first three fields little-endian.
func efiGUID(d1 uint32, d2, d3 uint16, d4 [8]byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, d1)
	b = binary.LittleEndian.AppendUint16(b, d2)
	b = binary.LittleEndian.AppendUint16(b, d3)
	return append(b, d4[:]...)
}

var (
	globalVariable   = efiGUID(0x8be4df61, 0x93ca, 0x11d2, [8]byte{0xaa, 0x0d, 0x00, 0xe0, 0x98, 0x03, 0x2b, 0x8c})
	imageSecurityDB  = efiGUID(0xd719b2cb, 0x3d3a, 0x4596, [8]byte{0xa3, 0xbc, 0xda, 0xd0, 0x0e, 0x67, 0x65, 0x6f})
	certX509GUID     = efiGUID(0xa5c059a1, 0x94e4, 0x4aa7, [8]byte{0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0, 0x72})
	certSHA256GUID   = efiGUID(0xc1c41626, 0x504c, 0x4092, [8]byte{0xac, 0xa9, 0x41, 0xf9, 0x36, 0x93, 0x43, 0x28})
	signatureOwner   = efiGUID(0x77fa9abd, 0x0359, 0x4d32, [8]byte{0xbd, 0x60, 0x28, 0xf4, 0xe7, 0x8f, 0x78, 0x4b})
	bootOrderContent = []byte{0x01, 0x00, 0x00, 0x00}
)

// variableData encodes UEFI_VARIABLE_DATA.
func variableData(guid []byte, name string, data []byte) []byte {
	u := utf16.Encode([]rune(name))
	b := append([]byte(nil), guid...)
	b = binary.LittleEndian.AppendUint64(b, uint64(len(u)))
	b = binary.LittleEndian.AppendUint64(b, uint64(len(data)))
	for _, c := range u {
		b = binary.LittleEndian.AppendUint16(b, c)
	}
	return append(b, data...)
}

// signatureList encodes one EFI_SIGNATURE_LIST of entries of one type.
func signatureList(typ []byte, entries ...[]byte) []byte {
	size := 16 + len(entries[0])
	b := append([]byte(nil), typ...)
	b = binary.LittleEndian.AppendUint32(b, uint32(28+size*len(entries)))
	b = binary.LittleEndian.AppendUint32(b, 0) // SignatureHeaderSize
	b = binary.LittleEndian.AppendUint32(b, uint32(size))
	for _, e := range entries {
		b = append(b, signatureOwner...)
		b = append(b, e...)
	}
	return b
}

// cert is a self-signed Ed25519 certificate made from a fixed seed, so the
// same name gives the same bytes (and PCR 7) in every run (Ed25519
// signatures are deterministic; rand goes unused).
func cert(name string) []byte {
	seed := sha256.Sum256([]byte("attesttest key " + name))
	key := ed25519.NewKeyFromSeed(seed[:])
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             t0,
		NotAfter:              t0.AddDate(20, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		panic(err) // fixed input: cannot fail
	}
	return der
}

// measured is an event whose digest is the hash of its data.
func measured(pcr int, typ uint32, data []byte) Event {
	return Event{PCR: pcr, Type: typ, Digest: sha256.Sum256(data), Data: data}
}

// blob is an event whose digest is the hash of something the log only
// describes (a firmware volume, an image).
func blob(pcr int, typ uint32, content string, data []byte) Event {
	return Event{PCR: pcr, Type: typ, Digest: sha256.Sum256([]byte(content)), Data: data}
}

func separator(pcr int) Event { return measured(pcr, evSeparator, []byte{0, 0, 0, 0}) }

func utf16z(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s + "\x00")) {
		b = binary.LittleEndian.AppendUint16(b, c)
	}
	return b
}

// imageLoad encodes UEFI_IMAGE_LOAD_EVENT with an end-of-path device path.
func imageLoad() []byte {
	end := []byte{0x7f, 0xff, 0x04, 0x00}
	b := binary.LittleEndian.AppendUint64(nil, 0x7e000000) // ImageLocationInMemory
	b = binary.LittleEndian.AppendUint64(b, 0x100000)      // ImageLengthInMemory
	b = binary.LittleEndian.AppendUint64(b, 0)             // ImageLinkTimeAddress
	b = binary.LittleEndian.AppendUint64(b, uint64(len(end)))
	return append(b, end...)
}
