package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// session is a TPM process that has been through CMD_INIT and TPM2_Startup
// and serves one data connection.
type session struct {
	p *proc
	w *wire
}

// golden is one permanent state loaded into every session, so that both
// implementations hold the same seeds: CreatePrimary with the same template
// then derives the same key, with the same work, in both.
type golden struct {
	flags uint32
	blob  []byte
}

// startSession starts a TPM with a data channel in a fresh state directory,
// loads g (if any), and sends CMD_INIT and TPM2_Startup(CLEAR).
func startSession(im *impl, base string, g *golden) (*session, error) {
	o, err := newInstanceDir(base)
	if err != nil {
		return nil, err
	}
	var p *proc
	for attempt := 0; ; attempt++ {
		if o.dataPort, err = freePort(); err != nil {
			return nil, err
		}
		if p, err = spawn(im, o); err != nil {
			return nil, err
		}
		if err = p.connectCtrl(time.Millisecond, 20*time.Second); err == nil {
			break
		}
		if attempt == 2 || !p.exited() {
			return nil, err
		}
		// Most likely someone else took the port between our probe and bind.
	}
	s := &session{p: p}
	if err := s.setup(g); err != nil {
		s.close(true)
		return nil, err
	}
	return s, nil
}

func (s *session) setup(g *golden) error {
	if g != nil {
		if err := s.p.setPermanent(g.flags, g.blob); err != nil {
			return err
		}
	}
	if err := s.p.init(); err != nil {
		return err
	}
	var err error
	if s.w, err = dialData(s.p.opts.dataPort); err != nil {
		return s.p.failed("data channel", err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(s.w); err != nil {
		return s.p.failed("TPM2_Startup", err)
	}
	return nil
}

// close stops the process and removes its directory unless keep is set.
func (s *session) close(remove bool) error {
	if s.w != nil {
		s.w.Close()
	}
	err := s.p.stop()
	if remove {
		err = errors.Join(err, removeInstanceDir(s.p.opts))
	}
	return err
}

// makeGolden manufactures a TPM with im and returns its permanent state.
func makeGolden(im *impl, base string) (*golden, error) {
	s, err := startSession(im, base, nil)
	if err != nil {
		return nil, err
	}
	flags, blob, err := s.p.getPermanent()
	return &golden{flags: flags, blob: blob}, errors.Join(err, s.close(true))
}

// recorder is a transport that keeps the last command it passed on.
type recorder struct {
	transport.TPM
	last []byte
}

// Send implements transport.TPM.
func (r *recorder) Send(cmd []byte) ([]byte, error) {
	r.last = append([]byte(nil), cmd...)
	return r.TPM.Send(cmd)
}

// responseCode checks a raw response's code.
func responseCode(rsp []byte) error {
	if rc := binary.BigEndian.Uint32(rsp[6:10]); rc != 0 {
		return fmt.Errorf("TPM response code 0x%x", rc)
	}
	return nil
}

var ownerAuth = tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}

func getRandom(w transport.TPM) error {
	rsp, err := tpm2.GetRandom{BytesRequested: 32}.Execute(w)
	if err != nil {
		return fmt.Errorf("TPM2_GetRandom: %w", err)
	}
	if len(rsp.RandomBytes.Buffer) != 32 {
		return fmt.Errorf("TPM2_GetRandom returned %d bytes", len(rsp.RandomBytes.Buffer))
	}
	return nil
}

var extendDigest = make([]byte, 32)

func pcrExtend(w transport.TPM) error {
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(16), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{
			{HashAlg: tpm2.TPMAlgSHA256, Digest: extendDigest},
		}},
	}.Execute(w)
	if err != nil {
		return fmt.Errorf("TPM2_PCR_Extend: %w", err)
	}
	return nil
}

const nvIndex = tpm2.TPMHandle(0x01500001)

// nvDefine defines an ordinary 64-byte index written and read with its own
// (empty) password, and returns it with its name.
func nvDefine(w *wire) (tpm2.NamedHandle, error) {
	pub := tpm2.TPMSNVPublic{
		NVIndex: nvIndex,
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			OwnerWrite: true, OwnerRead: true, AuthWrite: true, AuthRead: true,
			NT: tpm2.TPMNTOrdinary, NoDA: true,
		},
		DataSize: 64,
	}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: ownerAuth, PublicInfo: tpm2.New2B(pub)}).Execute(w); err != nil {
		return tpm2.NamedHandle{}, fmt.Errorf("TPM2_NV_DefineSpace: %w", err)
	}
	rp, err := tpm2.NVReadPublic{NVIndex: nvIndex}.Execute(w)
	if err != nil {
		return tpm2.NamedHandle{}, fmt.Errorf("TPM2_NV_ReadPublic: %w", err)
	}
	return tpm2.NamedHandle{Handle: nvIndex, Name: rp.NVName}, nil
}

// nvWrite writes 64 bytes that differ with i.
func nvWrite(w *wire, nv tpm2.NamedHandle, i int) error {
	data := make([]byte, 64)
	binary.BigEndian.PutUint64(data, uint64(i))
	_, err := tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: nv.Handle, Name: nv.Name, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    nv,
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: data},
	}.Execute(w)
	if err != nil {
		return fmt.Errorf("TPM2_NV_Write: %w", err)
	}
	return nil
}

// uniqueBytes is the template's unique field for iteration i: a different
// key each iteration, the same one in both implementations.
func uniqueBytes(n, i int) []byte {
	b := make([]byte, n)
	binary.BigEndian.PutUint64(b, uint64(i))
	return b
}

func eccTemplate(i int) tpm2.TPMTPublic {
	t := tpm2.ECCSRKTemplate
	t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: uniqueBytes(32, i)},
		Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
	})
	return t
}

func rsaTemplate(i int) tpm2.TPMTPublic {
	t := tpm2.RSASRKTemplate
	t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: uniqueBytes(256, i)})
	return t
}

// createPrimary creates a primary key in the owner hierarchy, flushes it,
// and returns its public area and the time the CreatePrimary itself took.
func createPrimary(w *wire, t tpm2.TPMTPublic) ([]byte, time.Duration, error) {
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: ownerAuth, InPublic: tpm2.New2B(t)}.Execute(w)
	if err != nil {
		return nil, 0, fmt.Errorf("TPM2_CreatePrimary: %w", err)
	}
	took := w.last
	if _, err := (tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}).Execute(w); err != nil {
		return nil, 0, fmt.Errorf("TPM2_FlushContext: %w", err)
	}
	return rsp.OutPublic.Bytes(), took, nil
}

// shutdownClear sends TPM2_Shutdown(CLEAR), as an OS does before power-off.
func shutdownClear(w *wire) error {
	if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}).Execute(w); err != nil {
		return fmt.Errorf("TPM2_Shutdown: %w", err)
	}
	return nil
}
