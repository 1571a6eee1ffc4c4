package hostd

import (
	"fmt"
	"io"
	"strings"

	hostv1 "vtpm/api/vtpm/host/v1"
)

// PeerListing is a peer as `host list` shows it.
type PeerListing struct {
	Name        string `json:"name"`
	Address     string `json:"address"`
	Guardian    string `json:"guardian"`
	Fingerprint string `json:"fingerprint"`
	Reachable   bool   `json:"reachable"`
	Version     string `json:"version,omitempty"`
	// Certificate is "trusted" (issued under the trusted guardian),
	// "changed" (issued under another one: refused) or "unknown" (not
	// reached).
	Certificate string `json:"certificate"`
	// PresentedFingerprint is the guardian a changed certificate named.
	PresentedFingerprint string `json:"presented_fingerprint,omitempty"`
	Error                string `json:"error,omitempty"`
}

// PeerColumns head the columns of [PeerListing.Row].
var PeerColumns = []string{"NAME", "ADDRESS", "REACHABLE", "VERSION", "CERTIFICATE", "GUARDIAN"}

// Listing is st as `host list` shows it.
func Listing(st *hostv1.PeerStatus) PeerListing {
	p := st.GetPeer()
	l := PeerListing{Name: p.GetName(), Address: p.GetAddress(), Guardian: p.GetGuardianName(), Fingerprint: p.GetGuardianFingerprint(),
		Reachable: st.GetReachable(), Version: st.GetVersion(), PresentedFingerprint: st.GetPresentedGuardianFingerprint(), Error: st.GetError()}
	switch st.GetCertStatus() {
	case hostv1.CertStatus_CERT_STATUS_TRUSTED:
		l.Certificate = "trusted"
	case hostv1.CertStatus_CERT_STATUS_CHANGED:
		l.Certificate = "changed"
	default:
		l.Certificate = "unknown"
	}
	return l
}

// Row is l as a line of the list; the guardian as its name and the first
// 16 digits of its fingerprint, as `guardian list` shows them.
func (l PeerListing) Row() []string {
	reach, version, cert := "no", l.Version, l.Certificate
	if l.Reachable {
		reach = "yes"
	}
	if version == "" {
		version = "-"
	}
	if l.Certificate == "changed" {
		cert = "CHANGED"
	}
	fp := l.Fingerprint
	if len(fp) > 16 {
		fp = fp[:16]
	}
	return []string{l.Name, l.Address, reach, version, cert, strings.TrimSpace(l.Guardian + " (" + fp + ")")}
}

// HostInfo is a host's GetInfo as `host info` shows it.
type HostInfo struct {
	Name               string   `json:"name"`
	Version            string   `json:"version"`
	Guardian           string   `json:"guardian"`
	Fingerprint        string   `json:"fingerprint"`
	QEMU               string   `json:"qemu,omitempty"`
	MachineTypes       []string `json:"machine_types,omitempty"`
	Firmware           []string `json:"firmware,omitempty"`
	IsolationAvailable bool     `json:"isolation_available"`
	LandlockABI        int      `json:"landlock_abi"`
	FreeBytes          uint64   `json:"free_bytes"`
}

// Info is r as `host info` shows it.
func Info(r *hostv1.GetInfoResponse) HostInfo {
	return HostInfo{Name: r.GetName(), Version: r.GetVersion(), Guardian: r.GetGuardianName(), Fingerprint: r.GetGuardianFingerprint(),
		QEMU: r.GetQemuVersion(), MachineTypes: r.GetMachineTypes(), Firmware: r.GetFirmware(),
		IsolationAvailable: r.GetIsolationAvailable(), LandlockABI: int(r.GetLandlockAbi()), FreeBytes: r.GetFreeBytes()}
}

// WriteText writes i as text, one fact a line.
func (i HostInfo) WriteText(w io.Writer) {
	qemu := i.QEMU
	if qemu == "" {
		qemu = "not installed"
	}
	isolation := "unavailable (no Landlock)"
	if i.IsolationAvailable {
		isolation = fmt.Sprintf("available (Landlock ABI %d)", i.LandlockABI)
	}
	fmt.Fprintf(w, "name:        %s\nversion:     %s\nguardian:    %s\nfingerprint: %s\nqemu:        %s (%d machine types)\nfirmware:    %s\nisolation:   %s\nfree:        %d MiB in the data root\n",
		i.Name, i.Version, i.Guardian, i.Fingerprint, qemu, len(i.MachineTypes), strings.Join(i.Firmware, ", "), isolation, i.FreeBytes>>20)
}
