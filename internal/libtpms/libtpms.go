// Package libtpms binds libtpms, the TPM 2.0 engine that runs every vTPM.
//
// libtpms keeps all of its state in process globals (the TPM itself, the
// callback table, cached state blobs, debug settings), so a process hosts at
// most one TPM: Open returns it, and a second Open fails until Close. Every
// call is serialised by a mutex; only Cancel may overlap a running Process.
//
// Persistent state leaves libtpms through a Storage: libtpms calls Store
// ("permall") after every NV change and Load at start-up, which lets the
// caller seal the blobs however it likes.
//
// This is the project's only cgo package; the C side (callbacks.c) is a table
// of trampolines into the exported Go functions in callbacks.go.
package libtpms

/*
#cgo LDFLAGS: -ltpms
#include <stdlib.h>
#include <libtpms/tpm_library.h>
#include <libtpms/tpm_tis.h>
#include <libtpms/tpm_error.h>
*/
import "C"

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"unsafe"

	"vtpm/internal/tpmrc"
)

// StateType numbers follow libtpms (TPMLIB_STATE_*), not the ptm blob numbers.
// They are bit flags: ValidateState accepts an OR of them.
type StateType uint32

// State types.
const (
	Permanent StateType = C.TPMLIB_STATE_PERMANENT  // "permall"
	Volatile  StateType = C.TPMLIB_STATE_VOLATILE   // "volatilestate"
	SaveState StateType = C.TPMLIB_STATE_SAVE_STATE // "savestate"; TPM 1.2 only
)

// Name returns the blob name libtpms passes to Storage for the type.
func (t StateType) Name() string {
	switch t {
	case Permanent:
		return "permall"
	case Volatile:
		return "volatilestate"
	case SaveState:
		return "savestate"
	}
	return fmt.Sprintf("StateType(%d)", uint32(t))
}

// cCodes pairs tpmrc's codes with libtpms' definitions of them (tpm_error.h);
// a test checks that they agree.
var cCodes = map[tpmrc.Code]uint32{
	tpmrc.TPMSuccess:         C.TPM_SUCCESS,
	tpmrc.TPMBadParameter:    C.TPM_BAD_PARAMETER,
	tpmrc.TPMFail:            C.TPM_FAIL,
	tpmrc.TPMBadOrdinal:      C.TPM_BAD_ORDINAL,
	tpmrc.TPMKeyNotFound:     C.TPM_KEYNOTFOUND,
	tpmrc.TPMSize:            C.TPM_SIZE,
	tpmrc.TPMIOError:         C.TPM_IOERROR,
	tpmrc.TPMEncryptError:    C.TPM_ENCRYPT_ERROR,
	tpmrc.TPMDecryptError:    C.TPM_DECRYPT_ERROR,
	tpmrc.TPMInvalidPostInit: C.TPM_INVALID_POSTINIT,
	tpmrc.TPMBadKeyProperty:  C.TPM_BAD_KEY_PROPERTY,
	tpmrc.TPMBadDataSize:     C.TPM_BAD_DATASIZE,
	tpmrc.TPMBadMode:         C.TPM_BAD_MODE,
	tpmrc.TPMBadVersion:      C.TPM_BAD_VERSION,
	tpmrc.TPMBadType:         C.TPM_BAD_TYPE,
	tpmrc.TPMBadLocality:     C.TPM_BAD_LOCALITY,
	tpmrc.TPMRetry:           C.TPM_RETRY,
}

// result converts a libtpms return code to nil or an error wrapping its
// tpmrc.Code. libtpms also passes TPM 2.0 response codes through (MainInit
// reports failure mode as tpmrc.TPMRCFailure).
func result(rc C.TPM_RESULT) error {
	if rc == C.TPM_SUCCESS {
		return nil
	}
	return fmt.Errorf("libtpms: %w", tpmrc.Code(rc))
}

// Errors for calls the binding refuses before they reach libtpms, because
// libtpms would act on missing or live state.
var (
	ErrClosed     = errors.New("libtpms: TPM is closed; Open a new one")
	ErrNotRunning = errors.New("libtpms: TPM is not running; call Init first")
	ErrRunning    = errors.New("libtpms: TPM is running; call Terminate first")
)

// Storage receives libtpms' NV callbacks. name is "permall", "volatilestate"
// or "savestate".
//
// Load returns an error wrapping fs.ErrNotExist when the blob does not exist
// (reported as TPM_RETRY, so libtpms manufactures a fresh TPM). Other errors
// become TPM_FAIL, or the tpmrc.Code the error is or wraps (TPMDecryptError for
// a wrong key, say). Delete with mustExist false may return fs.ErrNotExist.
//
// The methods run on the goroutine that called into the TPM, while the TPM's
// lock is held: they must not call back into the TPM and should not block
// for long.
type Storage interface {
	Init() error
	Load(name string) ([]byte, error)
	Store(name string, data []byte) error
	Delete(name string, mustExist bool) error
}

// TPM is the process's libtpms TPM 2.0. All methods are safe for concurrent
// use (serialised by a mutex), except that Cancel may run concurrently with
// Process, as libtpms intends.
type TPM struct {
	storage Storage // read by callbacks; fixed at Open

	mu       sync.Mutex
	closed   bool
	rbuf     *C.uchar // persistent response buffer, grown by libtpms
	rbufSize C.uint32_t

	running  atomic.Bool   // written under mu; read by Cancel and Running
	locality atomic.Uint32 // read by the locality callback during Process
}

var (
	openMu       sync.Mutex
	active       atomic.Pointer[TPM] // the open TPM; callbacks use its Storage
	registerOnce sync.Once
	registerErr  error
)

// Open returns the process's TPM, with state kept in s. The TPM is not running
// until Init. Open fails while another TPM from this process is still open.
func Open(s Storage) (*TPM, error) {
	if s == nil {
		return nil, errors.New("libtpms: Open needs a Storage for the TPM state")
	}
	openMu.Lock()
	defer openMu.Unlock()
	if active.Load() != nil {
		return nil, errors.New("libtpms: a TPM is already open in this process; Close it first (libtpms hosts one TPM per process)")
	}
	registerOnce.Do(func() { registerErr = registerCallbacks() })
	if registerErr != nil {
		return nil, registerErr
	}
	// TPM 1.2 is libtpms' default; choosing early makes GetState and
	// SetState work before the first Init.
	if err := result(C.TPMLIB_ChooseTPMVersion(C.TPMLIB_TPM_VERSION_2)); err != nil {
		return nil, fmt.Errorf("libtpms: choosing TPM 2.0: %w", err)
	}
	t := &TPM{storage: s}
	active.Store(t)
	return t, nil
}

// Close terminates the TPM if it is running, drops any state cached by
// SetState and releases the process's TPM slot. Close is idempotent.
func (t *TPM) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	t.terminate()
	// Cached blobs outlive Terminate; the next Open must not inherit them.
	if err := clearCachedState(); err != nil {
		slog.Error("libtpms: dropping cached state blobs at Close", "err", err)
	}
	if t.rbuf != nil {
		C.free(unsafe.Pointer(t.rbuf))
		t.rbuf, t.rbufSize = nil, 0
	}
	t.closed = true
	openMu.Lock()
	active.CompareAndSwap(t, nil)
	openMu.Unlock()
}

// Init (re)starts the TPM: it terminates a running TPM, then loads the
// permanent state (a SetState blob, else Storage "permall", else a freshly
// manufactured TPM) and the volatile state if there is one. It returns a
// tpmrc.Code when libtpms fails, e.g. TPMRCFailure for unusable state.
func (t *TPM) Init() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrClosed
	}
	t.terminate()
	if err := result(C.TPMLIB_ChooseTPMVersion(C.TPMLIB_TPM_VERSION_2)); err != nil {
		return err
	}
	if err := result(C.TPMLIB_MainInit()); err != nil {
		// Leave libtpms stopped, so GetState reads Storage rather than the
		// failed TPM's memory.
		t.terminate()
		return err
	}
	t.running.Store(true)
	return nil
}

// Terminate stops the TPM, discarding volatile state that was not saved.
// It is harmless when the TPM is not running.
func (t *TPM) Terminate() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	t.terminate()
}

func (t *TPM) terminate() {
	C.TPMLIB_Terminate()
	t.running.Store(false)
}

// Running reports whether Init succeeded and Terminate has not been called.
func (t *TPM) Running() bool { return t.running.Load() }

// lockRunning locks t and checks that the TPM can execute commands.
// On success the caller must unlock.
func (t *TPM) lockRunning() error {
	t.mu.Lock()
	switch {
	case t.closed:
		t.mu.Unlock()
		return ErrClosed
	case !t.running.Load():
		t.mu.Unlock()
		return ErrNotRunning
	}
	return nil
}

// lockOpen locks t and checks that it is not closed. On success the caller
// must unlock.
func (t *TPM) lockOpen() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return ErrClosed
	}
	return nil
}

// Process executes one TPM 2.0 command and returns a copy of the response.
// TPM errors are inside the response; an error means libtpms could not run
// the command at all.
func (t *TPM) Process(cmd []byte) ([]byte, error) {
	if err := t.lockRunning(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	if uint64(len(cmd)) > uint64(^uint32(0)) {
		return nil, fmt.Errorf("libtpms: command of %d bytes is too large", len(cmd))
	}
	// libtpms decrypts parameters in place, so it gets its own copy.
	c := C.CBytes(cmd)
	defer C.free(c)
	rbuf, size := t.rbuf, t.rbufSize
	var rlen C.uint32_t
	rc := C.TPMLIB_Process(&rbuf, &rlen, &size, (*C.uchar)(c), C.uint32_t(len(cmd)))
	t.rbuf, t.rbufSize = rbuf, size
	if err := result(rc); err != nil {
		return nil, err
	}
	return C.GoBytes(unsafe.Pointer(rbuf), C.int(rlen)), nil
}

// Send is Process; it makes *TPM a go-tpm transport.TPM.
func (t *TPM) Send(cmd []byte) ([]byte, error) { return t.Process(cmd) }

// Cancel asks libtpms to abort the command Process is executing. It has no
// effect on later commands: Process clears the request when it starts.
func (t *TPM) Cancel() {
	// Deliberately lock-free: the only point is to overlap a Process.
	if t.running.Load() {
		C.TPMLIB_CancelCommand()
	}
}

// SetLocality sets the locality libtpms sees for the following commands.
func (t *TPM) SetLocality(loc uint8) { t.locality.Store(uint32(loc)) }

// Locality returns the locality set by SetLocality (0 initially).
func (t *TPM) Locality() uint8 { return uint8(t.locality.Load()) }

// GetState returns a state blob. While the TPM is running it is serialised
// from memory (nil for SaveState); while stopped it is the blob cached by
// SetState or, failing that, what Storage loads.
func (t *TPM) GetState(typ StateType) ([]byte, error) {
	if err := t.lockOpen(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	var buf *C.uchar
	var n C.uint32_t
	if err := result(C.TPMLIB_GetState(C.enum_TPMLIB_StateType(typ), &buf, &n)); err != nil {
		return nil, fmt.Errorf("libtpms: getting %s state: %w", typ.Name(), err)
	}
	return takeBytes(buf, n), nil
}

// SetState caches a blob for the next Init, after libtpms checked that it
// unmarshals. It needs a stopped TPM (tpmrc.TPMInvalidPostInit otherwise), and
// Permanent must be set before Volatile. On a failure libtpms drops all
// cached blobs.
//
// Empty data drops the cached blobs, of every type: libtpms cannot drop just
// one. (TPMLIB_SetState with NULL would instead cache an "empty" state that
// makes the next Init start from blank NV without manufacturing, which no
// caller of this package wants.)
func (t *TPM) SetState(typ StateType, data []byte) error {
	if err := t.lockOpen(); err != nil {
		return err
	}
	defer t.mu.Unlock()
	if len(data) == 0 {
		if t.running.Load() {
			return nil // Init consumed whatever was cached
		}
		return clearCachedState()
	}
	if uint64(len(data)) > uint64(^uint32(0)) {
		return fmt.Errorf("libtpms: %s blob of %d bytes is too large", typ.Name(), len(data))
	}
	c := C.CBytes(data) // libtpms copies it
	defer C.free(c)
	if err := result(C.TPMLIB_SetState(C.enum_TPMLIB_StateType(typ), (*C.uchar)(c), C.uint32_t(len(data)))); err != nil {
		return fmt.Errorf("libtpms: setting %s state: %w", typ.Name(), err)
	}
	return nil
}

// ValidateState loads the given state types (an OR of StateType) through
// Storage and checks that they unmarshal. libtpms does this in the live
// TPM's memory, so the TPM must be stopped.
func (t *TPM) ValidateState(types StateType) error {
	if err := t.lockOpen(); err != nil {
		return err
	}
	defer t.mu.Unlock()
	if t.running.Load() {
		return ErrRunning
	}
	return result(C.TPMLIB_ValidateState(C.enum_TPMLIB_StateType(types), 0))
}

// VolatileAllStore serialises the running TPM's volatile state.
func (t *TPM) VolatileAllStore() ([]byte, error) {
	if err := t.lockRunning(); err != nil {
		return nil, err
	}
	defer t.mu.Unlock()
	var buf *C.uchar
	var n C.uint32_t
	if err := result(C.TPMLIB_VolatileAll_Store(&buf, &n)); err != nil {
		return nil, fmt.Errorf("libtpms: storing volatile state: %w", err)
	}
	return takeBytes(buf, n), nil
}

// SetBufferSize sets the command/response size the TPM reports, clamped to
// [min, max], and returns the size in effect. wanted 0 only queries.
func (t *TPM) SetBufferSize(wanted uint32) (size, min, max uint32) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var cmin, cmax C.uint32_t
	s := C.TPMLIB_SetBufferSize(C.uint32_t(wanted), &cmin, &cmax)
	return uint32(s), uint32(cmin), uint32(cmax)
}

// GetInfo returns libtpms' JSON description selected by flags
// (1 specification, 2 attributes, 4 features; may be ORed).
func (t *TPM) GetInfo(flags uint32) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := C.TPMLIB_GetInfo(C.enum_TPMLIB_InfoFlags(flags))
	if s == nil {
		return "", fmt.Errorf("libtpms: GetInfo(%#x) returned nothing (out of memory?)", flags)
	}
	defer C.free(unsafe.Pointer(s))
	return C.GoString(s), nil
}

// Established reports the TPM-established flag (set by HashStart).
func (t *TPM) Established() (bool, error) {
	if err := t.lockRunning(); err != nil {
		return false, err
	}
	defer t.mu.Unlock()
	var b C.TPM_BOOL
	if err := result(C.TPM_IO_TpmEstablished_Get(&b)); err != nil {
		return false, err
	}
	return b != 0, nil
}

// ResetEstablished clears the TPM-established flag. libtpms allows it only
// at locality 3 or 4 (tpmrc.TPMBadLocality otherwise), read via SetLocality.
func (t *TPM) ResetEstablished() error {
	if err := t.lockRunning(); err != nil {
		return err
	}
	defer t.mu.Unlock()
	return result(C.TPM_IO_TpmEstablished_Reset())
}

// HashStart begins a DRTM measurement sequence (_TPM_Hash_Start); it also
// sets the TPM-established flag.
func (t *TPM) HashStart() error {
	if err := t.lockRunning(); err != nil {
		return err
	}
	defer t.mu.Unlock()
	return result(C.TPM_IO_Hash_Start())
}

// HashData feeds data to the sequence started by HashStart.
func (t *TPM) HashData(b []byte) error {
	if err := t.lockRunning(); err != nil {
		return err
	}
	defer t.mu.Unlock()
	if len(b) == 0 {
		return nil
	}
	if uint64(len(b)) > uint64(^uint32(0)) {
		return fmt.Errorf("libtpms: hash data of %d bytes is too large; send it in pieces", len(b))
	}
	c := C.CBytes(b)
	defer C.free(c)
	return result(C.TPM_IO_Hash_Data((*C.uchar)(c), C.uint32_t(len(b))))
}

// HashEnd ends the sequence and extends the digest into PCR 17.
func (t *TPM) HashEnd() error {
	if err := t.lockRunning(); err != nil {
		return err
	}
	defer t.mu.Unlock()
	return result(C.TPM_IO_Hash_End())
}

// SetDebug sends libtpms' log to fd at the given level (0 disables it),
// each line starting with prefix.
func (t *TPM) SetDebug(fd int, level uint32, prefix string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	C.TPMLIB_SetDebugFD(C.int(fd))
	C.TPMLIB_SetDebugLevel(C.uint(level))
	if prefix == "" {
		C.TPMLIB_SetDebugPrefix(nil)
		return
	}
	cp := C.CString(prefix) // libtpms keeps its own copy
	defer C.free(unsafe.Pointer(cp))
	C.TPMLIB_SetDebugPrefix(cp)
}

// clearCachedState drops the blobs cached by SetState. libtpms only does that
// when the TPM version changes, so switch to 1.2 and back; it refuses while
// a TPM is running, when nothing can be cached anyway.
func clearCachedState() error {
	if err := result(C.TPMLIB_ChooseTPMVersion(C.TPMLIB_TPM_VERSION_1_2)); err != nil {
		return fmt.Errorf("libtpms: dropping cached state (switching to TPM 1.2): %w", err)
	}
	if err := result(C.TPMLIB_ChooseTPMVersion(C.TPMLIB_TPM_VERSION_2)); err != nil {
		return fmt.Errorf("libtpms: switching back to TPM 2.0: %w", err)
	}
	return nil
}

// Version returns libtpms' version as (major<<16)|(minor<<8)|micro.
func Version() uint32 { return uint32(C.TPMLIB_GetVersion()) }

// takeBytes copies a malloc'ed libtpms buffer into Go memory and frees it.
func takeBytes(buf *C.uchar, n C.uint32_t) []byte {
	if buf == nil {
		return nil
	}
	defer C.free(unsafe.Pointer(buf))
	return C.GoBytes(unsafe.Pointer(buf), C.int(n))
}
