package tpmrc

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"testing"

	"vtpm/internal/errdefs"
)

func TestError(t *testing.T) {
	for _, tt := range []struct {
		c    Code
		want string
	}{
		{TPMDecryptError, "TPM_DECRYPT_ERROR (0x21)"},
		{TPMRCFailure, "TPM_RC_FAILURE (TPM in failure mode) (0x101)"},
		{Code(0x99), "TPM result 0x99"},
	} {
		if got := tt.c.Error(); got != tt.want {
			t.Errorf("Code(0x%x).Error() = %q, want %q", uint32(tt.c), got, tt.want)
		}
	}
}

func TestOf(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		want Code
	}{
		{"nil", nil, TPMSuccess},
		{"plain error", bytes.ErrTooLarge, TPMFail},
		{"wrapped", fmt.Errorf("loading: %w", TPMDecryptError), TPMDecryptError},
		{"joined", fmt.Errorf("%w: %w", fs.ErrNotExist, TPMRetry), TPMRetry},
	} {
		if got := Of(tt.err); got != tt.want {
			t.Errorf("%s: Of = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestIs: codes answer errors.Is for their kind, as syscall.Errno does.
func TestIs(t *testing.T) {
	for _, tt := range []struct {
		c      Code
		target error
		want   bool
	}{
		{TPMRetry, fs.ErrNotExist, true},
		{TPMRetry, errdefs.ErrNotFound, true},
		{TPMKeyNotFound, errdefs.ErrNotFound, true},
		{TPMKeyNotFound, fs.ErrNotExist, false},
		{TPMBadParameter, errdefs.ErrInvalidArgument, true},
		{TPMBadOrdinal, errdefs.ErrFailedPrecondition, true},
		{TPMFail, errdefs.ErrInternal, true},
		{TPMRCFailure, errdefs.ErrInternal, true},
		{TPMRCFailure, TPMFail, false},
		{TPMDecryptError, errdefs.ErrDataLoss, false},
		{TPMIOError, errdefs.ErrInternal, false},
	} {
		err := fmt.Errorf("context: %w", tt.c)
		if got := errors.Is(err, tt.target); got != tt.want {
			t.Errorf("errors.Is(%v, %v) = %v, want %v", tt.c, tt.target, got, tt.want)
		}
	}
}

// TestWireValues pins the values swtpm's control channel and TPM 2.0 put
// on the wire.
func TestWireValues(t *testing.T) {
	for c, want := range map[Code]uint32{
		TPMBadParameter: 0x03, TPMFail: 0x09, TPMBadOrdinal: 0x0A, TPMSize: 0x17,
		TPMIOError: 0x1F, TPMBadLocality: 0x3D, TPMRetry: 0x800,
		TPMRCInitialize: 0x100, TPMRCFailure: 0x101, TPMRCValue | TPMRCP | TPMRC1: 0x1C4,
	} {
		if uint32(c) != want {
			t.Errorf("%v = 0x%x, want 0x%x", c, uint32(c), want)
		}
	}
}
