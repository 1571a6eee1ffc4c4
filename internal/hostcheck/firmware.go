package hostcheck

import (
	"os"
	"path/filepath"
	"strings"
)

// FirmwareDir holds the OVMF firmware files (Debian's ovmf package).
var FirmwareDir = "/usr/share/OVMF"

// OVMF's files in FirmwareDir.
const (
	OVMFCode       = "OVMF_CODE_4M.fd"
	OVMFVars       = "OVMF_VARS_4M.fd" // an empty variable store
	OVMFCodeSecure = "OVMF_CODE_4M.secboot.fd"
	OVMFVarsMS     = "OVMF_VARS_4M.ms.fd" // Microsoft's keys enrolled
)

// Firmware returns the paths of OVMF's code and of the variable-store
// template a VM boots with: the Secure Boot build with Microsoft's keys
// enrolled when secureBoot is set.
func Firmware(secureBoot bool) (code, vars string) {
	if secureBoot {
		return filepath.Join(FirmwareDir, OVMFCodeSecure), filepath.Join(FirmwareDir, OVMFVarsMS)
	}
	return filepath.Join(FirmwareDir, OVMFCode), filepath.Join(FirmwareDir, OVMFVars)
}

// FirmwareFiles are every OVMF file VMs and tests use.
func FirmwareFiles() []string {
	code, vars := Firmware(false)
	scode, svars := Firmware(true)
	return []string{code, vars, scode, svars}
}

// MissingFirmware returns the files among paths that do not exist.
func MissingFirmware(paths ...string) []string {
	var absent []string
	for _, p := range paths {
		if !exists(p) {
			absent = append(absent, p)
		}
	}
	return absent
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// FirmwareCheck reports the OVMF files a UEFI VM with Secure Boot needs.
func FirmwareCheck() Check {
	code, _ := Firmware(false)
	scode, svars := Firmware(true)
	files := []string{code, scode, svars}
	if absent := MissingFirmware(files...); len(absent) > 0 {
		return missing("ovmf", "absent: "+strings.Join(absent, ", "), advise("apt install ovmf"))
	}
	return ok("ovmf", strings.Join(files, ", "))
}
