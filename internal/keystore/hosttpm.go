package keystore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	"vtpm/internal/errdefs"
)

// DefaultHostTPM is the host TPM tried when Options.HostTPM is empty.
const DefaultHostTPM = "device:/dev/tpmrm0"

// persistentSRK is where the TCG provisioning guidance puts the SRK.
const persistentSRK = tpm2.TPMHandle(0x81000001)

const (
	tpmDialTimeout = 2 * time.Second
	tpmIOTimeout   = 30 * time.Second // TPM key generation can be slow; a hang must not be forever
	maxTPMResponse = 1 << 20
)

// errBadSpec reports a malformed Options.HostTPM.
var errBadSpec = errors.New("invalid host TPM setting")

// OpenHostTPM opens the host TPM named by spec ("device:PATH",
// "tcp:HOST:PORT" or "unix:PATH", the last two a swtpm-style raw data
// channel) for other rooms that use the host TPM directly, such as
// attestation.
func OpenHostTPM(spec string) (transport.TPMCloser, error) { return openHostTPM(spec) }

// openHostTPM opens the TPM named by spec ("device:PATH", "tcp:HOST:PORT" or
// "unix:PATH").
func openHostTPM(spec string) (transport.TPMCloser, error) {
	kind, arg, ok := strings.Cut(spec, ":")
	switch {
	case ok && kind == "device" && arg != "":
		t, err := linuxtpm.Open(arg)
		switch {
		case err == nil:
			return t, nil
		case errors.Is(err, fs.ErrPermission):
			return nil, errf(ErrPermission, err, "cannot open host TPM %s: %v", arg, err).with(runAsOwner(arg), errdefs.Advise("or add this user to the group owning %s (usually tss)", arg))
		default:
			return nil, errf(ErrHostTPMMissing, err, "no host TPM at %s (%v); enable the TPM in the firmware and load the tpm_tis or tpm_crb driver, or set VTPM_HOST_TPM to the TPM to use", arg, err)
		}
	case ok && (kind == "tcp" || kind == "unix") && arg != "":
		c, err := net.DialTimeout(kind, arg, tpmDialTimeout)
		if err != nil {
			return nil, errf(ErrHostTPMMissing, err, "no host TPM listening at %s (%v); start the TPM service there, or set VTPM_HOST_TPM to the TPM to use", arg, err)
		}
		return &tcpTPM{conn: c}, nil
	}
	return nil, errf(errBadSpec, nil, "host TPM setting %q is invalid; use \"device:/dev/tpmrm0\", \"tcp:HOST:PORT\", \"unix:PATH\", \"none\" (file protection) or \"\" (auto)", spec)
}

// tcpTPM sends raw TPM commands over a stream, one response per command,
// as swtpm's data channel (and vtpm's) speaks it.
type tcpTPM struct {
	mu   sync.Mutex
	conn net.Conn
}

func (t *tcpTPM) Send(cmd []byte) ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.conn.SetDeadline(time.Now().Add(tpmIOTimeout)); err != nil {
		return nil, err
	}
	if _, err := t.conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("send TPM command to %s: %w", t.conn.RemoteAddr(), err)
	}
	var hdr [10]byte
	if _, err := io.ReadFull(t.conn, hdr[:]); err != nil {
		return nil, fmt.Errorf("read TPM response header from %s: %w", t.conn.RemoteAddr(), err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < uint32(len(hdr)) || size > maxTPMResponse {
		return nil, fmt.Errorf("TPM at %s sent a response of impossible size %d", t.conn.RemoteAddr(), size)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr[:])
	if _, err := io.ReadFull(t.conn, rsp[len(hdr):]); err != nil {
		return nil, fmt.Errorf("read TPM response from %s: %w", t.conn.RemoteAddr(), err)
	}
	return rsp, nil
}

func (t *tcpTPM) Close() error { return t.conn.Close() }

// srk is a loaded storage root key.
type srk struct {
	handle     tpm2.TPMHandle
	name       tpm2.TPM2BName
	pub        tpm2.TPMTPublic
	persistent bool
}

func (s *srk) authHandle(auth tpm2.Session) tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: s.handle, Name: s.name, Auth: auth}
}

func (s *srk) flush(t transport.TPM) {
	if !s.persistent {
		_, _ = tpm2.FlushContext{FlushHandle: s.handle}.Execute(t)
	}
}

// loadSRK returns the owner hierarchy's ECC P-256 SRK. When want is given
// and a persistent SRK with that name exists, it is used as is (one
// ReadPublic instead of a key derivation); otherwise the SRK is created
// from the TCG template, which yields the same key for the same seed.
func loadSRK(t transport.TPM, want []byte) (*srk, error) {
	if len(want) > 0 {
		if rp, err := (tpm2.ReadPublic{ObjectHandle: persistentSRK}).Execute(t); err == nil && bytes.Equal(rp.Name.Buffer, want) {
			if pub, err := rp.OutPublic.Contents(); err == nil {
				return &srk{handle: persistentSRK, name: rp.Name, pub: *pub, persistent: true}, nil
			}
		}
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(t)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCBadAuth) || errors.Is(err, tpm2.TPMRCAuthFail) || errors.Is(err, tpm2.TPMRCLockout) {
			return nil, errf(ErrPermission, err, "the host TPM refused to create its storage root key (%v): its owner hierarchy has a password or is locked out; provision an ECC SRK at persistent handle 0x81000001 (tpm2_createprimary -C o -G ecc -c srk.ctx && tpm2_evictcontrol -C o -c srk.ctx 0x81000001), or use VTPM_HOST_TPM=none", err)
		}
		return nil, fmt.Errorf("create the host TPM's storage root key: %w", err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("parse the host TPM's storage root key: %w", err)
	}
	return &srk{handle: rsp.ObjectHandle, name: rsp.Name, pub: *pub}, nil
}

// sealedKey is what master.tpm keeps: a sealed-data object and the TPM it
// belongs to.
type sealedKey struct {
	public  []byte // TPM2B_PUBLIC
	private []byte // TPM2B_PRIVATE
	srkName []byte
}

// encryptedSession is a one-shot HMAC session salted to the SRK, so the
// secret crossing the bus (or socket) is AES-CFB encrypted in dir.
func encryptedSession(s *srk, dir int) tpm2.Session {
	d := tpm2.EncryptIn
	if dir == 1 {
		d = tpm2.EncryptOut
	}
	return tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.AESEncryption(128, d), tpm2.Salted(s.handle, s.pub))
}

// sealToTPM seals key under the SRK of t.
func sealToTPM(t transport.TPM, key []byte) (*sealedKey, error) {
	s, err := loadSRK(t, nil)
	if err != nil {
		return nil, err
	}
	defer s.flush(t)
	tmpl := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:     true,
			FixedParent:  true,
			UserWithAuth: true,
			NoDA:         true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
		}),
	}
	rsp, err := tpm2.Create{
		ParentHandle: s.authHandle(encryptedSession(s, 0)),
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: key}),
		}},
		InPublic: tpm2.New2B(tmpl),
	}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("seal the keystore master key to the host TPM: %w", err)
	}
	return &sealedKey{
		public:  tpm2.Marshal(rsp.OutPublic),
		private: tpm2.Marshal(rsp.OutPrivate),
		srkName: s.name.Buffer,
	}, nil
}

// errTPMChanged is returned by unsealFromTPM when the object belongs to
// another TPM; the caller words the full message.
var errTPMChanged = errors.New("sealed to another TPM")

// shortName abbreviates a TPM name (hash algorithm and digest) for messages.
func shortName(n []byte) string {
	if len(n) > 10 {
		return fmt.Sprintf("%x…", n[:10])
	}
	return fmt.Sprintf("%x", n)
}

// unsealFromTPM recovers the key sealed in sk. The returned bool says
// whether the persistent SRK was used.
func unsealFromTPM(t transport.TPM, sk *sealedKey) ([]byte, bool, error) {
	s, err := loadSRK(t, sk.srkName)
	if err != nil {
		return nil, false, err
	}
	defer s.flush(t)
	if !bytes.Equal(s.name.Buffer, sk.srkName) {
		return nil, false, fmt.Errorf("%w: its storage root key is now %s, the key was sealed under %s", errTPMChanged, shortName(s.name.Buffer), shortName(sk.srkName))
	}
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](sk.public)
	if err != nil {
		return nil, false, fmt.Errorf("%w: public area: %v", ErrCorrupt, err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](sk.private)
	if err != nil {
		return nil, false, fmt.Errorf("%w: private area: %v", ErrCorrupt, err)
	}
	ld, err := tpm2.Load{
		ParentHandle: s.authHandle(tpm2.PasswordAuth(nil)),
		InPrivate:    *priv,
		InPublic:     *pub,
	}.Execute(t)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCIntegrity) {
			return nil, false, fmt.Errorf("%w: loading the sealed key failed its integrity check: %w", errTPMChanged, err)
		}
		if isParamError(err) {
			return nil, false, fmt.Errorf("%w: the TPM rejected the sealed object: %v", ErrCorrupt, err)
		}
		return nil, false, fmt.Errorf("load the sealed master key into the host TPM: %w", err)
	}
	defer tpm2.FlushContext{FlushHandle: ld.ObjectHandle}.Execute(t)
	us, err := tpm2.Unseal{
		ItemHandle: tpm2.AuthHandle{Handle: ld.ObjectHandle, Name: ld.Name, Auth: encryptedSession(s, 1)},
	}.Execute(t)
	if err != nil {
		return nil, false, fmt.Errorf("unseal the keystore master key: %w", err)
	}
	return us.OutData.Buffer, s.persistent, nil
}

// isParamError reports a TPM format-1 error (one about a handle, session
// or parameter), as a malformed blob produces.
func isParamError(err error) bool {
	var f tpm2.TPMFmt1Error
	return errors.As(err, &f)
}

// closeTPM closes a host TPM connection, ignoring errors: nothing was
// written that a failed close could lose.
func closeTPM(t transport.TPMCloser) { _ = t.Close() }
