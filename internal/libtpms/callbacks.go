package libtpms

/*
#include <stdlib.h>
#include <libtpms/tpm_library.h>
#include <libtpms/tpm_error.h>

TPM_RESULT vtpm_register_callbacks(void);
*/
import "C"

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"unsafe"

	"vtpm/internal/tpmrc"
)

// The functions below run inside libtpms calls, which hold the open TPM's
// mutex, so they must not take it. They must never panic across the C frame
// nor block: a failure becomes a TPM result code for libtpms.

// callbackTPM returns the TPM whose Storage serves the callbacks.
func callbackTPM() (*TPM, C.TPM_RESULT) {
	t := active.Load()
	if t == nil {
		slog.Error("libtpms: callback while no TPM is open")
		return nil, C.TPM_FAIL
	}
	return t, C.TPM_SUCCESS
}

// recoverCallback turns a panic in a callback into TPM_FAIL.
func recoverCallback(op string, rc *C.TPM_RESULT) {
	if r := recover(); r != nil {
		slog.Error("libtpms: panic in storage callback", "op", op, "panic", r)
		*rc = C.TPM_FAIL
	}
}

// resultFor maps a Storage error to the code libtpms expects.
func resultFor(err error) C.TPM_RESULT {
	var r tpmrc.Code
	switch {
	case errors.As(err, &r) && r != tpmrc.TPMSuccess:
		return C.TPM_RESULT(r)
	case errors.Is(err, fs.ErrNotExist):
		return C.TPM_RETRY
	default:
		return C.TPM_FAIL
	}
}

//export vtpmNVRAMInit
func vtpmNVRAMInit() (rc C.TPM_RESULT) {
	defer recoverCallback("init", &rc)
	t, rc := callbackTPM()
	if t == nil {
		return rc
	}
	if err := t.storage.Init(); err != nil {
		slog.Error("libtpms: initialising state storage failed", "err", err)
		return resultFor(err)
	}
	return C.TPM_SUCCESS
}

//export vtpmNVRAMLoadData
func vtpmNVRAMLoadData(data **C.uchar, length *C.uint32_t, cname *C.char) (rc C.TPM_RESULT) {
	defer recoverCallback("load", &rc)
	t, rc := callbackTPM()
	if t == nil {
		return rc
	}
	name := C.GoString(cname)
	b, err := t.storage.Load(name)
	if err != nil {
		// A missing blob is routine: libtpms probes for it and manufactures.
		if errors.Is(err, fs.ErrNotExist) {
			slog.Debug("libtpms: state blob does not exist", "name", name)
		} else {
			slog.Error("libtpms: loading state blob failed", "name", name, "err", err)
		}
		return resultFor(err)
	}
	if uint64(len(b)) > math.MaxUint32 {
		slog.Error("libtpms: state blob too large", "name", name, "size", len(b))
		return C.TPM_FAIL
	}
	// libtpms takes ownership and releases it with free().
	p := C.malloc(C.size_t(max(len(b), 1)))
	if p == nil {
		return C.TPM_SIZE
	}
	copy(unsafe.Slice((*byte)(p), len(b)), b)
	*data = (*C.uchar)(p)
	*length = C.uint32_t(len(b))
	return C.TPM_SUCCESS
}

//export vtpmNVRAMStoreData
func vtpmNVRAMStoreData(data *C.uchar, length C.uint32_t, cname *C.char) (rc C.TPM_RESULT) {
	defer recoverCallback("store", &rc)
	t, rc := callbackTPM()
	if t == nil {
		return rc
	}
	name := C.GoString(cname)
	b := C.GoBytes(unsafe.Pointer(data), C.int(length))
	if err := t.storage.Store(name, b); err != nil {
		slog.Error("libtpms: storing state blob failed", "name", name, "err", err)
		return resultFor(err)
	}
	return C.TPM_SUCCESS
}

//export vtpmNVRAMDeleteName
func vtpmNVRAMDeleteName(cname *C.char, mustExist C.TPM_BOOL) (rc C.TPM_RESULT) {
	defer recoverCallback("delete", &rc)
	t, rc := callbackTPM()
	if t == nil {
		return rc
	}
	name := C.GoString(cname)
	err := t.storage.Delete(name, mustExist != 0)
	if err == nil || (mustExist == 0 && errors.Is(err, fs.ErrNotExist)) {
		return C.TPM_SUCCESS
	}
	slog.Error("libtpms: deleting state blob failed", "name", name, "err", err)
	if errors.Is(err, fs.ErrNotExist) {
		// Unlike a load, a missing blob here is an error, not a retry.
		return C.TPM_FAIL
	}
	return resultFor(err)
}

//export vtpmIOGetLocality
func vtpmIOGetLocality(loc *C.TPM_MODIFIER_INDICATOR) (rc C.TPM_RESULT) {
	defer recoverCallback("locality", &rc)
	t, rc := callbackTPM()
	if t == nil {
		*loc = 0
		return rc
	}
	*loc = C.TPM_MODIFIER_INDICATOR(t.locality.Load())
	return C.TPM_SUCCESS
}

// registerCallbacks installs the callback table. libtpms keeps it in a
// global, and it only refers to package globals, so once per process is enough.
func registerCallbacks() error {
	if rc := C.vtpm_register_callbacks(); rc != C.TPM_SUCCESS {
		return fmt.Errorf("libtpms: registering callbacks: %w", tpmrc.Code(rc))
	}
	return nil
}
