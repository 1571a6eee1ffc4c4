package attest

import (
	"crypto"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"vtpm/internal/errdefs"
	"vtpm/internal/keystore"
)

// DefaultEventLog is where Linux exposes the firmware's measured-boot event
// log.
const DefaultEventLog = "/sys/kernel/security/tpm0/binary_bios_measurements"

// DefaultTPM is the host TPM used when none is named: the keystore's.
const DefaultTPM = keystore.DefaultHostTPM

// PCRs are the PCRs quoted: the firmware's (PC Client PCRs 0–7).
var PCRs = []int{0, 1, 2, 3, 4, 5, 6, 7}

// EKType selects the endorsement key template.
type EKType string

// Endorsement key templates (TCG EK Credential Profile, low range).
const (
	EKRSA EKType = "rsa" // RSA 2048, the default
	EKECC EKType = "ecc" // ECC P-256
)

// HostOptions says which TPM and event log a host attests with.
type HostOptions struct {
	// TPM names the host TPM: "device:PATH" (or a bare path), "tcp:HOST:PORT"
	// or "unix:PATH" for a swtpm-style data channel. Empty is DefaultTPM.
	TPM string
	// EventLog is the measured-boot event log's path. Empty is
	// DefaultEventLog.
	EventLog string
	// EK selects the endorsement key. Empty is EKRSA.
	EK EKType
}

// Host is the host side of TPM-mode attestation: its TPM with the EK and an
// AK loaded. It is not safe for concurrent use.
type Host struct {
	tpm      transport.TPMCloser
	eventLog string
	ek       loaded
	ak       loaded
}

type loaded struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	public []byte // TPMT_PUBLIC
}

// OpenHost opens the host's TPM and creates its EK and AK (both primary
// keys, recreated identically from the TPM's endorsement seed each time).
func OpenHost(opts HostOptions) (*Host, error) {
	spec := opts.TPM
	switch {
	case spec == "":
		spec = DefaultTPM
	case strings.HasPrefix(spec, "/"):
		spec = "device:" + spec
	}
	t, err := keystore.OpenHostTPM(spec)
	if err != nil {
		return nil, err
	}
	t = retrying{t}
	h := &Host{tpm: t, eventLog: opts.EventLog}
	if h.eventLog == "" {
		h.eventLog = DefaultEventLog
	}
	tmpl := tpm2.RSAEKTemplate
	switch opts.EK {
	case "", EKRSA:
	case EKECC:
		tmpl = tpm2.ECCEKTemplate
	default:
		t.Close()
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "endorsement key type %q is not %q or %q", opts.EK, EKRSA, EKECC)
	}
	if h.ek, err = createPrimary(t, tmpl); err != nil {
		t.Close()
		return nil, fmt.Errorf("create the endorsement key in the host TPM at %s: %w", spec, err)
	}
	if h.ak, err = createPrimary(t, akTemplate); err != nil {
		h.Close()
		return nil, fmt.Errorf("create an attestation key in the host TPM at %s: %w", spec, err)
	}
	return h, nil
}

// retrying resends a command the TPM answered with a warning that asks for
// it (TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING): libtpms answers the first
// signature after start-up with TPM_RC_RETRY while it tests the algorithm.
type retrying struct{ transport.TPMCloser }

func (r retrying) Send(cmd []byte) ([]byte, error) {
	for try := 0; ; try++ {
		rsp, err := r.TPMCloser.Send(cmd)
		if err != nil || len(rsp) < 10 || try == 20 {
			return rsp, err
		}
		switch tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])) {
		case tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting:
			time.Sleep(time.Duration(try+1) * 10 * time.Millisecond)
		default:
			return rsp, nil
		}
	}
}

func createPrimary(t transport.TPM, tmpl tpm2.TPMTPublic) (loaded, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(t)
	if err != nil {
		return loaded{}, err
	}
	return loaded{handle: rsp.ObjectHandle, name: rsp.Name, public: rsp.OutPublic.Bytes()}, nil
}

// Close flushes the keys and closes the TPM.
func (h *Host) Close() error {
	for _, k := range []loaded{h.ak, h.ek} {
		if k.handle != 0 {
			_, _ = tpm2.FlushContext{FlushHandle: k.handle}.Execute(h.tpm)
		}
	}
	return h.tpm.Close()
}

// EKPublic returns the EK's public area (TPMT_PUBLIC).
func (h *Host) EKPublic() []byte { return append([]byte(nil), h.ek.public...) }

// EK returns the EK's public key, as an administrator registers it.
func (h *Host) EK() (crypto.PublicKey, error) {
	return ParseEK(h.ek.public)
}

// AKPublic returns the AK's public area (TPMT_PUBLIC).
func (h *Host) AKPublic() []byte { return append([]byte(nil), h.ak.public...) }

// Answer answers a challenge: it activates the credential and quotes PCRs
// 0–7 over the challenge's nonce, with the event log.
func (h *Host) Answer(c Challenge) (*Evidence, error) {
	secret, err := h.Activate(c)
	if err != nil {
		return nil, err
	}
	ev, err := h.Quote(c.Nonce)
	if err != nil {
		return nil, err
	}
	ev.Secret = secret
	return ev, nil
}

// Activate runs TPM2_ActivateCredential: the TPM decrypts the challenge's
// secret with the EK, and only if it was made for this TPM's AK.
func (h *Host) Activate(c Challenge) ([]byte, error) {
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: h.ak.handle, Name: h.ak.name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle: tpm2.AuthHandle{
			Handle: h.ek.handle,
			Name:   h.ek.name,
			// The EK's policy: TPM2_PolicySecret(TPM_RH_ENDORSEMENT).
			Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, s tpm2.TPMISHPolicy, nonce tpm2.TPM2BNonce) error {
				_, err := tpm2.PolicySecret{
					AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
					PolicySession: s,
					NonceTPM:      nonce,
				}.Execute(t)
				return err
			}),
		},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: c.CredentialBlob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: c.EncryptedSecret},
	}.Execute(h.tpm)
	if err != nil {
		return nil, &EvidenceError{Reason: ReasonActivation, Detail: "the host TPM could not activate the credential", Err: err}
	}
	return rsp.CertInfo.Buffer, nil
}

// Quote quotes PCRs 0–7 (SHA-256) over nonce and reads their values and the
// event log.
func (h *Host) Quote(nonce []byte) (*Evidence, error) {
	sel := tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: pcrSelect(PCRs),
	}}}
	q, err := tpm2.Quote{
		SignHandle:     tpm2.AuthHandle{Handle: h.ak.handle, Name: h.ak.name, Auth: tpm2.PasswordAuth(nil)},
		QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect:      sel,
	}.Execute(h.tpm)
	if err != nil {
		return nil, fmt.Errorf("quote PCRs 0-7 with the host TPM: %w", err)
	}
	pcrs, err := readPCRs(h.tpm)
	if err != nil {
		return nil, err
	}
	log, err := os.ReadFile(h.eventLog)
	if err != nil {
		return nil, eventLogError(h.eventLog, err)
	}
	return &Evidence{
		Quote:     q.Quoted.Bytes(),
		Signature: tpm2.Marshal(q.Signature),
		PCRs:      pcrs,
		EventLog:  log,
	}, nil
}

// readPCRs reads the SHA-256 values of PCRs 0–7, in as many reads as the
// TPM needs (it returns at most 8 digests per read).
func readPCRs(t transport.TPM) ([][]byte, error) {
	out := make([][]byte, len(PCRs))
	todo := append([]int(nil), PCRs...)
	for len(todo) > 0 {
		rsp, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
			Hash: tpm2.TPMAlgSHA256, PCRSelect: pcrSelect(todo),
		}}}}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("read PCRs with the host TPM: %w", err)
		}
		got := selected(rsp.PCRSelectionOut)
		if len(got) == 0 || len(got) != len(rsp.PCRValues.Digests) {
			return nil, fmt.Errorf("the host TPM has no SHA-256 bank for PCRs %v", todo)
		}
		for i, p := range got {
			out[p] = rsp.PCRValues.Digests[i].Buffer
		}
		var rest []int
		for _, p := range todo {
			if out[p] == nil {
				rest = append(rest, p)
			}
		}
		todo = rest
	}
	return out, nil
}

// pcrSelect is the PC Client selection bitmap (3 bytes) of pcrs.
func pcrSelect(pcrs []int) []byte {
	u := make([]uint, len(pcrs))
	for i, p := range pcrs {
		u[i] = uint(p)
	}
	return tpm2.PCClientCompatible.PCRs(u...)
}

// selected lists the SHA-256 PCRs a selection names, in order.
func selected(l tpm2.TPMLPCRSelection) []int {
	var out []int
	for _, s := range l.PCRSelections {
		if s.Hash != tpm2.TPMAlgSHA256 {
			continue
		}
		for i, b := range s.PCRSelect {
			for bit := range 8 {
				if b&(1<<bit) != 0 {
					out = append(out, i*8+bit)
				}
			}
		}
	}
	return out
}

func eventLogError(path string, err error) error {
	e := &errdefs.Error{Kind: errdefs.ErrFailedPrecondition, Msg: fmt.Sprintf("read the measured-boot event log %s", path), Err: err}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		e.Kind = errdefs.ErrNotFound
		e.Fix = []errdefs.Remedy{errdefs.Advise("mount securityfs (mount -t securityfs securityfs /sys/kernel/security) on a host whose firmware measures its boot, or configure the event log's path")}
	case errors.Is(err, fs.ErrPermission):
		e.Kind = errdefs.ErrPermissionDenied
		e.Fix = []errdefs.Remedy{errdefs.Advise("read it as root: the host service runs as root")}
	}
	return e
}

// CaptureHost makes a policy from this host's boot: it attests the host to
// itself (the same checks a key service makes, with the host's own EK as
// the registered one) and captures the proven PCR values for class. Run it
// on a reference host, booted with Secure Boot on.
func CaptureHost(opts HostOptions, name, class string) (*Policy, error) {
	h, err := OpenHost(opts)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	ek, err := h.EK()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	s, c, err := NewSession(ek, h.EKPublic(), h.AKPublic(), now, 0, nil)
	if err != nil {
		return nil, err
	}
	ev, err := h.Answer(*c)
	if err != nil {
		return nil, err
	}
	r, err := s.Verify(ev, now)
	if err != nil {
		return nil, fmt.Errorf("this host's own evidence does not verify: %w", err)
	}
	return Capture(name, class, r)
}
