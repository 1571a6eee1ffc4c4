package vm

import (
	"fmt"

	"vtpm/internal/errdefs"
)

// kindError is a sentinel of this package that also matches an errdefs kind.
type kindError struct {
	msg  string
	kind error
}

func (e *kindError) Error() string        { return e.msg }
func (e *kindError) Is(target error) bool { return target == e.kind }

// ErrConflict reports a name or UUID that is already registered. It
// matches errdefs.ErrConflict.
var ErrConflict error = &kindError{"already registered", errdefs.ErrConflict}

// ErrNotFound reports a VM that is not registered on this host. It matches
// errdefs.ErrNotFound.
var ErrNotFound error = &kindError{"no such VM", errdefs.ErrNotFound}

// NotFoundError is a reference (name or UUID) no VM registered on this host
// answers to.
type NotFoundError struct {
	Ref  string
	Root string // the data root searched, when known
}

func (e *NotFoundError) Error() string {
	s := fmt.Sprintf("%v %q on this host", ErrNotFound, e.Ref)
	if e.Root != "" {
		s += fmt.Sprintf(" (data root %s)", e.Root)
	}
	return s
}

// Unwrap returns ErrNotFound.
func (e *NotFoundError) Unwrap() error { return ErrNotFound }

// Remedies lists the registered VMs and registers a bundle.
func (e *NotFoundError) Remedies() []errdefs.Remedy {
	return []errdefs.Remedy{
		errdefs.Do(errdefs.ActionVMList).WithNote("the registered VMs"),
		errdefs.Do(errdefs.ActionVMRegister).WithNote("add a bundle"),
	}
}

// fixed is an error with the ways out of it; its message and chain are
// err's.
type fixed struct {
	err error
	fix []errdefs.Remedy
}

func (e *fixed) Error() string              { return e.err.Error() }
func (e *fixed) Unwrap() error              { return e.err }
func (e *fixed) Remedies() []errdefs.Remedy { return e.fix }

// withFix returns err with remedies attached.
func withFix(err error, fix ...errdefs.Remedy) error { return &fixed{err, fix} }

// precondition is a refusal in the VM's current state, with its remedies.
func precondition(fix []errdefs.Remedy, format string, a ...any) error {
	return errdefs.New(errdefs.ErrFailedPrecondition, format, a...).With(fix...)
}

func do(a errdefs.Action, args ...string) errdefs.Remedy { return errdefs.Do(a, args...) }
