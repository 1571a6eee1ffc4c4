package statefile

import (
	"errors"
	"fmt"
)

// Result is a TPM 1.2 style result code as swtpm returns it on the control
// channel. Errors from this package wrap one, so the control channel can
// answer with the same code swtpm would.
type Result uint32

// Result codes used by swtpm's state handling.
const (
	ResultBadParameter   Result = 0x03
	ResultFail           Result = 0x09
	ResultKeyNotFound    Result = 0x0D
	ResultIOError        Result = 0x1F
	ResultEncryptError   Result = 0x20
	ResultDecryptError   Result = 0x21
	ResultBadKeyProperty Result = 0x28
	ResultBadDataSize    Result = 0x2B
	ResultBadVersion     Result = 0x2E
	ResultBadType        Result = 0x34
	// ResultRetry is TPM_RETRY, the non-fatal bit: the state does not exist.
	ResultRetry Result = 0x800
)

var resultNames = map[Result]string{
	ResultBadParameter:   "TPM_BAD_PARAMETER",
	ResultFail:           "TPM_FAIL",
	ResultKeyNotFound:    "TPM_KEYNOTFOUND",
	ResultIOError:        "TPM_IOERROR",
	ResultEncryptError:   "TPM_ENCRYPT_ERROR",
	ResultDecryptError:   "TPM_DECRYPT_ERROR",
	ResultBadKeyProperty: "TPM_BAD_KEY_PROPERTY",
	ResultBadDataSize:    "TPM_BAD_DATASIZE",
	ResultBadVersion:     "TPM_BAD_VERSION",
	ResultBadType:        "TPM_BAD_TYPE",
	ResultRetry:          "TPM_RETRY",
}

func (r Result) Error() string {
	if n, ok := resultNames[r]; ok {
		return fmt.Sprintf("%s (0x%x)", n, uint32(r))
	}
	return fmt.Sprintf("TPM result 0x%x", uint32(r))
}

// ResultOf returns the swtpm result code carried by err: 0 for nil, and
// ResultFail for an error that carries none.
func ResultOf(err error) Result {
	if err == nil {
		return 0
	}
	var r Result
	if errors.As(err, &r) {
		return r
	}
	return ResultFail
}
