package instance_test

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// simConn is a go-tpm transport over a TPM's raw data channel that wraps
// every command in the TCG simulator's TPM_SEND_COMMAND prefix (locality
// 0), as the IBM TSS's socsim interface does, and unwraps the reply.
type simConn struct{ c net.Conn }

func (s *simConn) Send(cmd []byte) ([]byte, error) {
	s.c.SetDeadline(time.Now().Add(30 * time.Second))
	msg := binary.BigEndian.AppendUint32(nil, 8) // TPM_SEND_COMMAND
	msg = append(msg, 0)                         // locality
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(cmd)))
	if _, err := s.c.Write(append(msg, cmd...)); err != nil {
		return nil, err
	}
	var n [4]byte
	if _, err := io.ReadFull(s.c, n[:]); err != nil {
		return nil, err
	}
	size := binary.BigEndian.Uint32(n[:])
	if size < 10 || size > 4096 {
		return nil, fmt.Errorf("TPM response size %d", size)
	}
	rsp := make([]byte, size+4) // the response and the u32 acknowledgement
	if _, err := io.ReadFull(s.c, rsp); err != nil {
		return nil, err
	}
	if ack := binary.BigEndian.Uint32(rsp[size:]); ack != 0 {
		return nil, fmt.Errorf("TPM_SEND_COMMAND acknowledgement %d", ack)
	}
	return rsp[:size], nil
}

// dialSim connects to p's TCP data channel (a tcpDataUnixCtrl or tcpBoth
// process) with the simulator prefix.
func dialSim(t *testing.T, p *tpmProc) *simConn {
	t.Helper()
	addr := strings.NewReplacer("swtpm:host=", "", ",port=", ":").Replace(p.tcti)
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &simConn{c: c}
}

// volatileWork is the volatile state the tests carry across a restart or
// a --save/--load: unfinished SHA-1 and SHA-256 hash sequences and a
// transient primary key.
type volatileWork struct {
	seqs    map[tpm2.TPMAlgID]tpm2.TPMHandle
	key     tpm2.TPMHandle
	keyName []byte
}

// Each sequence is fed "123" before and "456" after, as swtpm's
// test_tpm2_save_load_state_3 does.
func startVolatileWork(t *testing.T, tpm *simConn) *volatileWork {
	t.Helper()
	w := &volatileWork{seqs: map[tpm2.TPMAlgID]tpm2.TPMHandle{}}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("TPM2_Startup: %v", err)
	}
	for _, alg := range []tpm2.TPMAlgID{tpm2.TPMAlgSHA1, tpm2.TPMAlgSHA256} {
		rsp, err := tpm2.HashSequenceStart{HashAlg: alg}.Execute(tpm)
		if err != nil {
			t.Fatalf("TPM2_HashSequenceStart(%v): %v", alg, err)
		}
		w.seqs[alg] = rsp.SequenceHandle
		seq := tpm2.AuthHandle{Handle: rsp.SequenceHandle, Auth: tpm2.PasswordAuth(nil)}
		if _, err := (tpm2.SequenceUpdate{SequenceHandle: seq, Buffer: tpm2.TPM2BMaxBuffer{Buffer: []byte("123")}}).Execute(tpm); err != nil {
			t.Fatalf("TPM2_SequenceUpdate(%v): %v", alg, err)
		}
	}
	key, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tpm)
	if err != nil {
		t.Fatalf("TPM2_CreatePrimary: %v", err)
	}
	w.key, w.keyName = key.ObjectHandle, key.Name.Buffer
	return w
}

// check completes the sequences and reads the key: the TPM resumed the
// volatile state without a TPM2_Startup.
func (w *volatileWork) check(t *testing.T, tpm *simConn, log fmt.Stringer) {
	t.Helper()
	sha1Sum, sha256Sum := sha1.Sum([]byte("123456")), sha256.Sum256([]byte("123456"))
	want := map[tpm2.TPMAlgID][]byte{tpm2.TPMAlgSHA1: sha1Sum[:], tpm2.TPMAlgSHA256: sha256Sum[:]}
	for _, alg := range []tpm2.TPMAlgID{tpm2.TPMAlgSHA1, tpm2.TPMAlgSHA256} {
		rsp, err := tpm2.SequenceComplete{
			SequenceHandle: tpm2.AuthHandle{Handle: w.seqs[alg], Auth: tpm2.PasswordAuth(nil)},
			Buffer:         tpm2.TPM2BMaxBuffer{Buffer: []byte("456")},
			Hierarchy:      tpm2.TPMRHNull,
		}.Execute(tpm)
		if err != nil {
			t.Fatalf("TPM2_SequenceComplete(%v) of the sequence started before: %v\nlog:\n%s", alg, err, log)
		}
		if !bytes.Equal(rsp.Result.Buffer, want[alg]) {
			t.Errorf("%v sequence: %x, want %x", alg, rsp.Result.Buffer, want[alg])
		}
	}
	pub, err := tpm2.ReadPublic{ObjectHandle: w.key}.Execute(tpm)
	if err != nil {
		t.Fatalf("TPM2_ReadPublic of the transient key: %v", err)
	}
	if !bytes.Equal(pub.Name.Buffer, w.keyName) {
		t.Errorf("transient key name %x, want %x", pub.Name.Buffer, w.keyName)
	}
}

// TestVolatileStateSurvivesRestart: CMD_STORE_VOLATILE, TPM2_Shutdown,
// CMD_SHUTDOWN, a new process on the same state and CMD_INIT resume the
// TPM where it was, hash sequences and transient objects included, as in
// swtpm (test_tpm2_save_load_state_3); the volatile state is consumed.
func TestVolatileStateSurvivesRestart(t *testing.T) {
	t.Parallel()
	needTools(t)
	for _, im := range impls {
		t.Run(string(im), func(t *testing.T) {
			t.Parallel()
			p := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl})
			p.mustIoctl(t, "-i")
			tpm := dialSim(t, p)
			w := startVolatileWork(t, tpm)
			p.mustIoctl(t, "-v")
			if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
				t.Fatalf("TPM2_Shutdown: %v", err)
			}
			tpm.c.Close()
			p.shutdown(t)

			home := filepath.Join(p.dir, "home")
			q := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, stateDir: p.stateDir, home: home})
			q.mustIoctl(t, "-i")
			tpm = dialSim(t, q)
			w.check(t, tpm, q.Stderr)
			tpm.c.Close()
			q.shutdown(t)

			// Loaded once: the next start is a TPM that needs TPM2_Startup.
			r := startTPM(t, im, tpmConfig{transport: tcpDataUnixCtrl, stateDir: p.stateDir, home: home})
			r.mustIoctl(t, "-i")
			tpm = dialSim(t, r)
			if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); !isRC(err, tpm2.TPMRCInitialize) {
				t.Errorf("TPM2_GetRandom on the next start: %v, want TPM_RC_INITIALIZE", err)
			}
			tpm.c.Close()
			r.shutdown(t)
		})
	}
}

func isRC(err error, rc tpm2.TPMRC) bool {
	var got tpm2.TPMRC
	return err != nil && errors.As(err, &got) && got == rc
}

// TestVolatileStateSaveLoad moves a TPM's permanent and volatile state
// blobs with swtpm_ioctl --save and --load (CMD_GET_STATEBLOB and
// CMD_SET_STATEBLOB) into a stopped TPM, between every pair of
// implementations: after CMD_INIT the hash sequences complete and the
// transient key is there.
func TestVolatileStateSaveLoad(t *testing.T) {
	t.Parallel()
	needTools(t)
	for _, src := range impls {
		for _, dst := range impls {
			t.Run(fmt.Sprintf("%s-to-%s", src, dst), func(t *testing.T) {
				t.Parallel()
				migArgs := hexKey.args(t, shortDir(t), "--migration-key")
				a := startTPM(t, src, tpmConfig{transport: tcpDataUnixCtrl, args: migArgs})
				a.mustIoctl(t, "-i")
				tpm := dialSim(t, a)
				w := startVolatileWork(t, tpm)
				tpm.c.Close()
				blobs := map[string]string{}
				for _, typ := range []string{"permanent", "volatile"} {
					blobs[typ] = filepath.Join(a.dir, typ+".blob")
					a.mustIoctl(t, "--save", typ, blobs[typ])
				}
				a.shutdown(t)

				b := startTPM(t, dst, tpmConfig{transport: tcpDataUnixCtrl, args: migArgs})
				for _, typ := range []string{"permanent", "volatile"} {
					b.mustIoctl(t, "--load", typ, blobs[typ])
				}
				b.mustIoctl(t, "-i")
				tpm = dialSim(t, b)
				w.check(t, tpm, b.Stderr)
				tpm.c.Close()
				b.shutdown(t)
			})
		}
	}
}

// TestSwtpmSavedVolatileState is the last part of swtpm's
// test_tpm2_save_load_state_3: state files that swtpm saved (with
// CMD_STORE_VOLATILE, hash sequences open) are copied into the directory
// of the next TPM, which resumes them after CMD_INIT. vtpm does so in
// swtpm's format, asked for or not; a directory that holds sealed state
// keeps serving the sealed state and ignores the copied files.
func TestSwtpmSavedVolatileState(t *testing.T) {
	t.Parallel()
	needTools(t)
	saver := startTPM(t, realSwtpm, tpmConfig{transport: tcpDataUnixCtrl})
	saver.mustIoctl(t, "-i")
	tpm := dialSim(t, saver)
	w := startVolatileWork(t, tpm)
	saver.mustIoctl(t, "-v")
	tpm.c.Close()
	saver.shutdown(t)
	saved := map[string][]byte{}
	for _, name := range []string{"tpm2-00.permall", "tpm2-00.volatilestate"} {
		saved[name] = mustReadFile(t, filepath.Join(saver.stateDir, name))
	}

	tests := []struct {
		name    string
		sealed  bool     // the directory holds sealed state first
		args    []string // more swtpm socket arguments
		resumes bool
	}{
		{"swtpm files", false, nil, true},
		{"swtpm format asked for", false, []string{"--tpmstate", "format=swtpm"}, true},
		{"sealed state", true, nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := shortDir(t)
			stateDir, home := filepath.Join(dir, "state"), filepath.Join(dir, "home")
			if tc.sealed {
				p := startTPM(t, ourVtpm, tpmConfig{transport: tcpDataUnixCtrl, stateDir: stateDir, home: home})
				p.mustIoctl(t, "-i")
				p.shutdown(t)
			} else if err := os.Mkdir(stateDir, 0o700); err != nil {
				t.Fatal(err)
			}
			for name, b := range saved {
				mustWriteFile(t, filepath.Join(stateDir, name), b)
			}
			args := tc.args
			if len(args) > 0 {
				args = []string{"--tpmstate", "dir=" + stateDir + "," + args[1]} // the last --tpmstate wins
			}
			q := startTPM(t, ourVtpm, tpmConfig{transport: tcpDataUnixCtrl, stateDir: stateDir, home: home, args: args})
			q.mustIoctl(t, "-i")
			tpm := dialSim(t, q)
			if tc.resumes {
				w.check(t, tpm, q.Stderr)
			} else {
				if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); !isRC(err, tpm2.TPMRCInitialize) {
					t.Errorf("sealed state beside copied swtpm files: TPM2_GetRandom %v, want TPM_RC_INITIALIZE (the sealed TPM, not resumed)", err)
				}
			}
			tpm.c.Close()
			q.shutdown(t)
			// After the exit, when the output is complete.
			if warned := strings.Contains(q.Stderr.String(), "also holds swtpm's state files"); warned != tc.sealed {
				t.Errorf("warned that copied swtpm files are ignored: %v, want %v\n%s", warned, tc.sealed, q.Stderr)
			}
		})
	}
}
