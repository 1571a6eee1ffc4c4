package instance_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"vtpm/internal/testutil"
)

// TestTpm2ToolsOverSwtpmTCTI runs tpm2-tools against vtpm through
// tpm2-tss' swtpm TCTI, over TCP (control on port+1) and over unix sockets
// (control at path.ctrl), then restarts vtpm on the same state and checks
// that the TPM is the same one.
func TestTpm2ToolsOverSwtpmTCTI(t *testing.T) {
	t.Parallel()
	needTools(t)
	testutil.Need(t, "tpm2_getrandom", "tpm2_createprimary", "tpm2_flushcontext", "tpm2_pcrextend", "tpm2_nvdefine", "tpm2_shutdown")
	tests := []struct {
		name      string
		transport transport
		tcti      *regexp.Regexp
	}{
		{"tcp", tcpBoth, regexp.MustCompile(`^swtpm:host=127\.0\.0\.1,port=\d+$`)},
		{"unixio", unixBoth, regexp.MustCompile(`^swtpm:path=/.*/tpm$`)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := startTPM(t, ourVtpm, tpmConfig{transport: tc.transport})
			if !tc.tcti.MatchString(p.tcti) {
				t.Fatalf("TCTI %q does not match %v", p.tcti, tc.tcti)
			}
			// The TCTI never sends CMD_INIT; the control channel does.
			if _, err := p.tpm2Err("tpm2_startup", "-c"); err == nil {
				t.Fatal("tpm2_startup succeeded before CMD_INIT")
			}
			p.mustIoctl(t, "-i")
			p.tpm2(t, "tpm2_startup", "-c")

			r1, r2 := p.tpm2(t, "tpm2_getrandom", "--hex", "16"), p.tpm2(t, "tpm2_getrandom", "--hex", "16")
			for _, r := range []string{r1, r2} {
				if b, err := hex.DecodeString(r); err != nil || len(b) != 16 {
					t.Errorf("tpm2_getrandom --hex 16: %q, want 32 hex digits", r)
				}
			}
			if r1 == r2 {
				t.Errorf("tpm2_getrandom gave %s twice", r1)
			}

			ecc := p.createPrimary(t, "ecc")
			for _, want := range []string{"type:\n  value: ecc", "curve-id:\n  value: NIST p256", "x: ", "y: "} {
				if !strings.Contains(ecc, want) {
					t.Errorf("tpm2_createprimary -G ecc output lacks %q:\n%s", want, ecc)
				}
			}
			rsa := p.createPrimary(t, "rsa")
			for _, want := range []string{"type:\n  value: rsa", "bits: 2048", "rsa: "} {
				if !strings.Contains(rsa, want) {
					t.Errorf("tpm2_createprimary -G rsa output lacks %q:\n%s", want, rsa)
				}
			}
			if again := p.createPrimary(t, "ecc"); again != ecc {
				t.Errorf("the same primary template gave a different key:\n%s\nthen\n%s", ecc, again)
			}

			digest := sha256.Sum256([]byte("boot component"))
			p.tpm2(t, "tpm2_pcrextend", testPCR+":sha256="+hex.EncodeToString(digest[:]))
			if got, want := p.readPCR(t), extendedPCR(digest); got != want {
				t.Errorf("PCR %s: %s, want %s", testPCR, got, want)
			}

			nv := []byte("written through the swtpm TCTI")
			p.defineWriteNV(t, nv)
			if got := p.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("tpm2_nvread: %q, want %q", got, nv)
			}
			p.tpm2(t, "tpm2_shutdown", "-c")
			p.shutdown(t)

			// Same state, new process: the seeds and the NV index survived.
			q := startTPM(t, ourVtpm, tpmConfig{transport: tc.transport, stateDir: p.stateDir, home: filepath.Join(p.dir, "home")})
			q.mustIoctl(t, "-i")
			q.tpm2(t, "tpm2_startup", "-c")
			if got := q.readNV(t, len(nv)); !bytes.Equal(got, nv) {
				t.Errorf("tpm2_nvread after restart: %q, want %q", got, nv)
			}
			if got := q.createPrimary(t, "ecc"); got != ecc {
				t.Errorf("ECC primary after restart differs: the owner seed was not kept:\n%s\nthen\n%s", ecc, got)
			}
			if got, want := q.readPCR(t), strings.Repeat("0", 64); got != want {
				t.Errorf("PCR %s after restart and TPM2_Startup(CLEAR): %s, want %s", testPCR, got, want)
			}
			q.shutdown(t)
		})
	}
}

// createPrimary creates a primary key under the owner hierarchy, flushes it,
// and returns tpm2_createprimary's description of its public area.
func (p *tpmProc) createPrimary(t *testing.T, alg string) string {
	t.Helper()
	ctx := filepath.Join(p.dir, alg+".ctx")
	out := p.tpm2(t, "tpm2_createprimary", "-C", "o", "-G", alg, "-c", ctx)
	p.tpm2(t, "tpm2_flushcontext", "-t")
	return out
}

// migKey is a --migration-key (or --key) configuration for the round trip.
type migKey struct {
	option string // with PWD standing for the passphrase file
	pass   string
}

func (k *migKey) args(t *testing.T, dir, flag string) []string {
	t.Helper()
	if k == nil {
		return nil
	}
	f := filepath.Join(dir, strings.TrimPrefix(flag, "--")+".pwd")
	if err := os.WriteFile(f, []byte(k.pass), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{flag, strings.ReplaceAll(k.option, "PWD", f)}
}

var (
	secretA = &migKey{option: "pwdfile=PWD,mode=aes-256-cbc", pass: "libvirt secret A"}
	secretB = &migKey{option: "pwdfile=PWD,mode=aes-256-cbc", pass: "libvirt secret B"}
	hexKey  = &migKey{option: "file=PWD", pass: "0x00112233445566778899aabbccddeeff\n"}
)

// TestStateBlobRoundTripWithSwtpm moves a TPM's permanent state between the
// real swtpm and vtpm (both ways) with swtpm_ioctl --save permanent and
// --load, as a migration does, with and without migration keys. A blob
// under the wrong migration key fails with TPM_DECRYPT_ERROR (0x21), one
// under a key the destination lacks with TPM_KEYNOTFOUND (0x0d), and then
// the destination has none of the source's state.
func TestStateBlobRoundTripWithSwtpm(t *testing.T) {
	t.Parallel()
	needTools(t)
	cases := []struct {
		name             string
		srcMig, dstMig   *migKey
		srcFile, dstFile *migKey // --key: state-file encryption, independent on each side
		wantOut          string
		wantRC           int
	}{
		{name: "no-keys"},
		{name: "shared-migration-key", srcMig: secretA, dstMig: secretA},
		{name: "shared-hex-migration-key", srcMig: hexKey, dstMig: hexKey},
		{name: "libvirt-keys", srcMig: secretA, dstMig: secretA, srcFile: secretA, dstFile: secretA},
		{name: "different-file-keys", srcFile: secretA, dstFile: hexKey},
		{name: "plain-blob-into-keyed-destination", dstMig: secretA},
		{name: "wrong-migration-key", srcMig: secretA, dstMig: secretB,
			wantOut: "TPM result from PTM_SET_STATEBLOB: 0x21\n", wantRC: 1},
		{name: "missing-migration-key", srcMig: secretA,
			wantOut: "TPM result from PTM_SET_STATEBLOB: 0xd\n", wantRC: 1},
	}
	directions := [][2]impl{{realSwtpm, ourVtpm}, {ourVtpm, realSwtpm}}
	for _, dir := range directions {
		for _, tc := range cases {
			t.Run(string(dir[0])+"-to-"+string(dir[1])+"/"+tc.name, func(t *testing.T) {
				t.Parallel()
				keyDir := shortDir(t)
				nv := []byte("migrated " + string(dir[0]) + " to " + string(dir[1]))

				srcArgs := append(tc.srcMig.args(t, keyDir, "--migration-key"), tc.srcFile.args(t, keyDir, "--key")...)
				src := startTPM(t, dir[0], tpmConfig{transport: unixBoth, args: srcArgs})
				src.mustIoctl(t, "-i")
				src.tpm2(t, "tpm2_startup", "-c")
				src.defineWriteNV(t, nv)
				blob := filepath.Join(keyDir, "permanent.blob")
				src.mustIoctl(t, "--save", "permanent", blob)
				src.shutdown(t)

				dstDir := shortDir(t)
				dstArgs := append(tc.dstMig.args(t, dstDir, "--migration-key"), tc.dstFile.args(t, dstDir, "--key")...)
				dst := startTPM(t, dir[1], tpmConfig{transport: unixBoth, args: dstArgs})
				wantOut, wantRC := tc.wantOut, tc.wantRC
				// A vtpm holding sealed state (no --key) encrypts its blobs
				// with a migration key derived from its data key unless
				// --migration-key is given, so only a host that can open
				// the TPM's key protector can load them.
				switch {
				case dir[0] == ourVtpm && tc.srcMig == nil && tc.srcFile == nil && tc.dstMig == nil:
					wantOut, wantRC = "TPM result from PTM_SET_STATEBLOB: 0xd\n", 1
				case dir[0] == ourVtpm && tc.srcMig == nil && tc.srcFile == nil:
					wantOut, wantRC = "TPM result from PTM_SET_STATEBLOB: 0x21\n", 1
				case dir[1] == ourVtpm && tc.dstMig == nil && tc.dstFile == nil && tc.srcMig != nil:
					wantOut, wantRC = "TPM result from PTM_SET_STATEBLOB: 0x21\n", 1
				}
				out, rc := dst.ioctl(t, "--load", "permanent", blob)
				if out != wantOut || rc != wantRC {
					t.Fatalf("--load permanent: exit %d, %q; want exit %d, %q\n%s log:\n%s", rc, out, wantRC, wantOut, dst.impl, dst.Stderr)
				}
				dst.mustIoctl(t, "-i")
				dst.tpm2(t, "tpm2_startup", "-c")
				if wantRC != 0 {
					if out, err := dst.tpm2Err("tpm2_nvread", testNVIndex, "-C", "o", "-s", "1"); err == nil {
						t.Errorf("the refused blob's NV index is readable:\n%s", out)
					}
				} else if got := dst.readNV(t, len(nv)); !bytes.Equal(got, nv) {
					t.Errorf("NV after --load: %q, want %q", got, nv)
				}
				dst.shutdown(t)
			})
		}
	}
}

// TestGetConfigReportsKeys: swtpm_ioctl -g shows which of --key (bit 0)
// and --migration-key (bit 1) are set, the same for vtpm and swtpm.
func TestGetConfigReportsKeys(t *testing.T) {
	t.Parallel()
	needTools(t)
	tests := []struct {
		name     string
		file     *migKey
		mig      *migKey
		wantFlag string
	}{
		{"none", nil, nil, "0x0"}, // vtpm: 0x2, see below
		{"key", secretA, nil, "0x1"},
		{"migration-key", nil, secretB, "0x2"},
		{"both", hexKey, secretA, "0x3"},
	}
	for _, tc := range tests {
		for _, im := range impls {
			t.Run(tc.name+"/"+string(im), func(t *testing.T) {
				t.Parallel()
				keys := shortDir(t)
				args := append(tc.file.args(t, keys, "--key"), tc.mig.args(t, keys, "--migration-key")...)
				p := startTPM(t, im, tpmConfig{transport: unixBoth, args: args})
				flag := tc.wantFlag
				if im == ourVtpm && tc.file == nil && tc.mig == nil {
					// Sealed state: its migration key is derived from its data key.
					flag = "0x2"
				}
				if got, want := p.mustIoctl(t, "-g"), "ptm configuration flags: "+flag+"\n"; got != want {
					t.Errorf("swtpm_ioctl -g: %q, want %q", got, want)
				}
				p.shutdown(t)
			})
		}
	}
}

// TestPrintCapabilitiesMatchesSwtpm compares `swtpm socket --tpm2
// --print-capabilities`: vtpm lists swtpm's features in swtpm's order,
// except where it deliberately differs: it is a TPM 2.0 only (no
// "tpm-1.2").
func TestPrintCapabilitiesMatchesSwtpm(t *testing.T) {
	t.Parallel()
	needTools(t)
	type caps struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
		Version  string   `json:"version"`
	}
	got := map[impl]caps{}
	for _, im := range impls {
		args := []string{"socket", "--tpm2", "--print-capabilities"}
		if im == ourVtpm {
			args = append([]string{"swtpm"}, args...)
		}
		out := testutil.Run(t, nil, im.exe(t), args...)
		var c caps
		if err := json.Unmarshal([]byte(out), &c); err != nil {
			t.Fatalf("%s --print-capabilities: %v\n%s", im, err, out)
		}
		if strings.Count(out, "\n") != 1 {
			t.Errorf("%s --print-capabilities is not one line: %q", im, out)
		}
		got[im] = c
	}
	sw, vt := got[realSwtpm], got[ourVtpm]
	want := slices.DeleteFunc(slices.Clone(sw.Features), func(f string) bool {
		return f == "tpm-1.2"
	})
	if !slices.Equal(vt.Features, want) {
		t.Errorf("vtpm features %q\nwant %q (swtpm's %q without tpm-1.2)", vt.Features, want, sw.Features)
	}
	if vt.Type != sw.Type || vt.Version != sw.Version {
		t.Errorf("vtpm reports type %q version %q; swtpm %q %q", vt.Type, vt.Version, sw.Type, sw.Version)
	}
}
