package manufacture

import (
	"bytes"
	"errors"
	"testing"
	"time"
)

// TestSetupWriteLog checks the lines of swtpm_setup's log that libvirt
// shows, for each way a run ends.
func TestSetupWriteLog(t *testing.T) {
	start := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	made := &Report{
		EKs: []EK{
			{Name: "RSA 2048", Handle: 0x81010001, CertIndex: 0x01c00002, Cert: []byte{1}},
			{Name: "ECC P-256", Handle: 0x81010002, CertIndex: 0x01c0000a},
		},
		PlatformCert: []byte{1}, PCRBanks: []string{"sha256"}, Available: []string{"sha1", "sha256"},
	}
	tests := []struct {
		name       string
		res        SetupResult
		err        error
		wantOut    string
		wantErrOut string
	}{
		{name: "kept", res: SetupResult{Kept: true}, wantOut: "Not overwriting existing state file.\n"},
		{name: "refused before it began", err: errors.New("--tpm-state must be provided"),
			wantErrOut: "--tpm-state must be provided\n"},
		{name: "made", res: SetupResult{User: "root:root", Started: start, Ended: start, Report: made, Banks: []string{"sha256"}},
			wantOut: "Starting vTPM manufacturing as root:root @ Mon Dec  7 10:00:00 UTC 2026\n" +
				"Successfully created RSA 2048 EK with handle 0x81010001.\n" +
				"Successfully created NVRAM area 0x1c00002 for RSA 2048 EK certificate.\n" +
				"Successfully created ECC EK with handle 0x81010002.\n" +
				"Successfully created NVRAM area 0x1c08000 for platform certificate.\n" +
				"Successfully activated PCR banks sha256 among sha1,sha256.\n" +
				"Successfully authored TPM state.\n" +
				"Ending vTPM manufacturing @ Mon Dec  7 10:00:00 UTC 2026\n"},
		{name: "failed while authoring", res: SetupResult{User: "root:root", Started: start, Ended: start, Failed: true},
			err: errors.New("no space left"),
			wantOut: "Starting vTPM manufacturing as root:root @ Mon Dec  7 10:00:00 UTC 2026\n" +
				"Ending vTPM manufacturing @ Mon Dec  7 10:00:00 UTC 2026\n",
			wantErrOut: "no space left\nAn error occurred. Authoring the TPM state failed.\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			tc.res.WriteLog(&out, &errOut, tc.err)
			if out.String() != tc.wantOut {
				t.Errorf("log:\n%s\nwant:\n%s", out.String(), tc.wantOut)
			}
			if errOut.String() != tc.wantErrOut {
				t.Errorf("errors:\n%s\nwant:\n%s", errOut.String(), tc.wantErrOut)
			}
		})
	}
}
