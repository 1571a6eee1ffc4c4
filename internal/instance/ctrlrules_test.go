package instance_test

import (
	"bytes"
	"io"
	"testing"
	"time"
)

// TestCtrlBodySizeRules sends control commands with bodies too short or too
// long, on a stopped and on a running TPM, and expects vtpm to answer as the
// real swtpm 0.7.1 does: TPM_BAD_PARAMETER (0x03) for a zero-body command
// with extra bytes, at once for a short SET_BUFFERSIZE or GET_INFO; the
// connection closed after the 500 ms deadline for other short bodies;
// TPM_BAD_ORDINAL (0x0a) first when the command needs a running TPM.
func TestCtrlBodySizeRules(t *testing.T) {
	t.Parallel()
	needTools(t)
	const eof = "EOF"
	tests := []struct {
		name    string
		running bool
		req     string
		want    string // hex reply, or "EOF" for a closed connection
	}{
		{"STOP with extra bytes", false, "0000000e00000000", "00000003"},
		{"GET_CONFIG with extra bytes", false, "0000000f0000", "00000003"},
		{"SET_BUFFERSIZE short", false, "000000110000", "00000003"},
		{"GET_INFO short", false, "000000120000000000000001", "00000003"},
		{"INIT short", false, "00000002000000", eof},
		{"INIT long", false, "000000020000000000", "00000003"},
		{"SET_LOCALITY empty", false, "00000005", eof},
		{"GET_STATEBLOB short", false, "0000000c0000000000000001", eof},
		{"GET_CAPABILITY with extra bytes", false, "00000001ffff", "000000000000ffff"},
		{"GET_TPMESTABLISHED with extra bytes, stopped", false, "000000040000", "0000000a"},
		{"GET_TPMESTABLISHED with extra bytes, running", true, "000000040000", "00000003"},
		{"HASH_START with extra bytes, running", true, "000000060000", "00000003"},
		{"CANCEL_TPM_CMD with extra bytes, running", true, "000000090000", "00000003"},
		{"STORE_VOLATILE with extra bytes, running", true, "0000000a0000", "00000003"},
		{"SET_BUFFERSIZE long", false, "00000011000000000000", "000000000000100000000af800001000"},
	}
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			stopped := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl})
			running := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl})
			running.mustIoctl(t, "-i")
			for _, tc := range tests {
				p := stopped
				if tc.running {
					p = running
				}
				c := dialCtrl(t, p.ctrlPath)
				if _, err := c.Write(unhex(tc.req)); err != nil {
					t.Fatalf("%s: write: %v", tc.name, err)
				}
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				if tc.want == eof {
					if got, err := io.ReadAll(c); len(got) != 0 || err != nil {
						t.Errorf("%s: got % x, %v; want the connection closed without a reply", tc.name, got, err)
					}
				} else {
					got := make([]byte, len(unhex(tc.want)))
					if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, unhex(tc.want)) {
						t.Errorf("%s: reply % x, %v; want %s", tc.name, got, err, tc.want)
					}
				}
				c.Close()
			}
		})
	}
}
