// Package attesttest stands in for a host's hardware TPM in tests: a swtpm
// process whose PCRs 0–7 are extended to a known UEFI boot, and the
// measured-boot event log (TCG PC Client, crypto-agile, SHA-256) that
// matches those extends, as firmware would leave them.
package attesttest

import (
	"crypto/sha256"
)

// Boot describes the boot a host TPM stand-in measured.
type Boot struct {
	// SecureBootOff measures SecureBoot=0 and no authority (PCR 7 differs).
	SecureBootOff bool
	// DB names the certificate in the signature database that verified the
	// boot loader; "" is the reference one. Another name changes PCR 7
	// only.
	DB string
	// Firmware is the firmware version string (PCR 0); "" is the
	// reference one.
	Firmware string
}

// Reference is the boot the reference host measured.
var Reference = Boot{}

// OtherDB is the reference boot with another signature database: Secure
// Boot on, PCR 7 differs.
var OtherDB = Boot{DB: "Other DB"}

// SecureBootOff is the reference boot with Secure Boot off: PCR 7 differs.
var SecureBootOff = Boot{SecureBootOff: true}

// Events returns the events of boot, in the order firmware measures them.
func (b Boot) Events() []Event {
	fw, db := b.Firmware, b.DB
	if fw == "" {
		fw = "vtpm test firmware 1.0"
	}
	if db == "" {
		db = "Reference DB"
	}
	dbCert := cert(db)
	sb := byte(1)
	if b.SecureBootOff {
		sb = 0
	}
	dbxHash := sha256.Sum256([]byte("a revoked boot loader"))

	ev := []Event{
		measured(0, evSCRTMVersion, utf16z(fw)),
		blob(0, evPostCode, "firmware volume "+fw, []byte("POST CODE")),
		measured(7, evEFIVariableDriverConfig, variableData(globalVariable, "SecureBoot", []byte{sb})),
		measured(7, evEFIVariableDriverConfig, variableData(globalVariable, "PK", signatureList(certX509GUID, cert("Platform Key")))),
		measured(7, evEFIVariableDriverConfig, variableData(globalVariable, "KEK", signatureList(certX509GUID, cert("Key Exchange Key")))),
		measured(7, evEFIVariableDriverConfig, variableData(imageSecurityDB, "db", signatureList(certX509GUID, dbCert))),
		measured(7, evEFIVariableDriverConfig, variableData(imageSecurityDB, "dbx", signatureList(certSHA256GUID, dbxHash[:]))),
		measured(1, evEFIVariableBoot, variableData(globalVariable, "BootOrder", bootOrderContent)),
		measured(4, evEFIAction, []byte("Calling EFI Application from Boot Option")),
	}
	for pcr := range 8 {
		ev = append(ev, separator(pcr))
	}
	if !b.SecureBootOff {
		// The boot loader verified against db: EFI_SIGNATURE_DATA of the
		// certificate that verified it.
		sig := append(append([]byte(nil), signatureOwner...), dbCert...)
		ev = append(ev, measured(7, evEFIVariableAuthority, variableData(imageSecurityDB, "db", sig)))
	}
	ev = append(ev, blob(4, evEFIBootServicesApplication, "boot loader image", imageLoad()))
	return ev
}

// PCRs returns the SHA-256 values PCRs 0–7 hold after boot's events.
func (b Boot) PCRs() [][]byte {
	out := make([][]byte, 8)
	for i := range out {
		out[i] = make([]byte, sha256.Size)
	}
	for _, e := range b.Events() {
		h := sha256.New()
		h.Write(out[e.PCR])
		h.Write(e.Digest[:])
		out[e.PCR] = h.Sum(nil)
	}
	return out
}

// Log returns boot's event log.
func (b Boot) Log() []byte { return EncodeLog(b.Events()) }
