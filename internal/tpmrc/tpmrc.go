// Package tpmrc is vtpm's one vocabulary of TPM result codes: the TPM 1.2
// style codes that libtpms returns and swtpm's control channel sends
// (tpm_error.h), and the TPM 2.0 response codes of the data channel. Names
// follow go-tpm: the specification's name without underscores.
//
// A Code is an error. Like syscall.Errno, it answers errors.Is for the
// errdefs kind it belongs to (and fs.ErrNotExist for TPMRetry), so callers
// can test what went wrong without knowing TPM numbers.
package tpmrc

import (
	"errors"
	"fmt"
	"io/fs"

	"vtpm/internal/errdefs"
)

// Code is a TPM result code as it travels on the wire: a big-endian u32 on
// swtpm's control channel, the response code of a TPM 2.0 response.
type Code uint32

// TPM 1.2 style codes (tpm_error.h), as libtpms and swtpm's control channel
// use them. The values are the wire values.
const (
	TPMSuccess         Code = 0x00
	TPMBadParameter    Code = 0x03
	TPMFail            Code = 0x09
	TPMBadOrdinal      Code = 0x0A
	TPMKeyNotFound     Code = 0x0D
	TPMSize            Code = 0x17
	TPMIOError         Code = 0x1F
	TPMEncryptError    Code = 0x20
	TPMDecryptError    Code = 0x21
	TPMInvalidPostInit Code = 0x26
	TPMBadKeyProperty  Code = 0x28
	TPMBadDataSize     Code = 0x2B
	TPMBadMode         Code = 0x2C
	TPMBadVersion      Code = 0x2E
	TPMBadType         Code = 0x34
	TPMBadLocality     Code = 0x3D
	// TPMRetry is TPM_RETRY, the non-fatal bit: for state, "it does not exist".
	TPMRetry Code = 0x800
)

// TPM 2.0 response codes (TPM 2.0 Part 2, TPM_RC) that vtpm produces or
// checks itself.
const (
	TPMRCSuccess Code = 0x000
	// TPMRCInitialize: TPM2_Startup was already done (or not yet).
	TPMRCInitialize Code = 0x100
	// TPMRCFailure: the TPM is in failure mode, or not initialised.
	TPMRCFailure Code = 0x101
	// TPMRCValue is a format-one code: combine it with TPMRCP and a
	// parameter number (TPMRC1...).
	TPMRCValue Code = 0x084
	// TPMRCP marks a format-one code as about a parameter.
	TPMRCP Code = 0x040
	// TPMRC1 is the parameter (or handle) number 1 of a format-one code.
	TPMRC1 Code = 0x100
)

var names = map[Code]string{
	TPMSuccess:         "TPM_SUCCESS",
	TPMBadParameter:    "TPM_BAD_PARAMETER",
	TPMFail:            "TPM_FAIL",
	TPMBadOrdinal:      "TPM_BAD_ORDINAL",
	TPMKeyNotFound:     "TPM_KEYNOTFOUND",
	TPMSize:            "TPM_SIZE",
	TPMIOError:         "TPM_IOERROR",
	TPMEncryptError:    "TPM_ENCRYPT_ERROR",
	TPMDecryptError:    "TPM_DECRYPT_ERROR",
	TPMInvalidPostInit: "TPM_INVALID_POSTINIT",
	TPMBadKeyProperty:  "TPM_BAD_KEY_PROPERTY",
	TPMBadDataSize:     "TPM_BAD_DATASIZE",
	TPMBadMode:         "TPM_BAD_MODE",
	TPMBadVersion:      "TPM_BAD_VERSION",
	TPMBadType:         "TPM_BAD_TYPE",
	TPMBadLocality:     "TPM_BAD_LOCALITY",
	TPMRetry:           "TPM_RETRY",
	TPMRCInitialize:    "TPM_RC_INITIALIZE",
	TPMRCFailure:       "TPM_RC_FAILURE (TPM in failure mode)",
}

func (c Code) Error() string {
	if n, ok := names[c]; ok {
		return fmt.Sprintf("%s (0x%x)", n, uint32(c))
	}
	return fmt.Sprintf("TPM result 0x%x", uint32(c))
}

// kinds says which errdefs kind a code is; codes absent here (I/O,
// encryption and decryption failures, whose cause the code does not tell)
// match none.
var kinds = map[Code]error{
	TPMBadParameter:    errdefs.ErrInvalidArgument,
	TPMBadDataSize:     errdefs.ErrInvalidArgument,
	TPMBadKeyProperty:  errdefs.ErrInvalidArgument,
	TPMBadLocality:     errdefs.ErrInvalidArgument,
	TPMBadMode:         errdefs.ErrInvalidArgument,
	TPMBadType:         errdefs.ErrInvalidArgument,
	TPMBadVersion:      errdefs.ErrInvalidArgument,
	TPMSize:            errdefs.ErrInvalidArgument,
	TPMBadOrdinal:      errdefs.ErrFailedPrecondition,
	TPMInvalidPostInit: errdefs.ErrFailedPrecondition,
	TPMRCInitialize:    errdefs.ErrFailedPrecondition,
	TPMKeyNotFound:     errdefs.ErrNotFound,
	TPMRetry:           errdefs.ErrNotFound,
	TPMFail:            errdefs.ErrInternal,
	TPMRCFailure:       errdefs.ErrInternal,
}

// Is reports whether c is of the errdefs kind target, or for TPMRetry
// whether target is fs.ErrNotExist (missing state is reported as TPM_RETRY).
func (c Code) Is(target error) bool {
	if c == TPMRetry && target == fs.ErrNotExist {
		return true
	}
	k, ok := kinds[c]
	return ok && k == target
}

// Of returns the code err carries: TPMSuccess for nil, TPMFail for an error
// that carries none.
func Of(err error) Code {
	if err == nil {
		return TPMSuccess
	}
	var c Code
	if errors.As(err, &c) {
		return c
	}
	return TPMFail
}
