// Package apierr carries vtpm's errors across its APIs as data: an errdefs
// error becomes a Connect error whose code is its kind's and whose detail
// (hostv1.ErrorDetail) holds the kind, the whole message and the remedies;
// the client turns it back into an error that matches the same kind with
// errors.Is and offers the same remedies, so a front end renders a remote
// failure exactly as a local one. Nothing parses messages.
package apierr

import (
	"errors"

	"connectrpc.com/connect"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/internal/errdefs"
)

// kinds maps each errdefs kind to its name on the wire and its code.
var kinds = []struct {
	kind error
	name string
	code connect.Code
}{
	{errdefs.ErrInvalidArgument, "invalid_argument", connect.CodeInvalidArgument},
	{errdefs.ErrNotFound, "not_found", connect.CodeNotFound},
	{errdefs.ErrAlreadyExists, "already_exists", connect.CodeAlreadyExists},
	{errdefs.ErrPermissionDenied, "permission_denied", connect.CodePermissionDenied},
	{errdefs.ErrFailedPrecondition, "failed_precondition", connect.CodeFailedPrecondition},
	{errdefs.ErrConflict, "conflict", connect.CodeAborted},
	{errdefs.ErrUnavailable, "unavailable", connect.CodeUnavailable},
	{errdefs.ErrDataLoss, "data_loss", connect.CodeDataLoss},
	{errdefs.ErrInternal, "internal", connect.CodeInternal},
}

// Code is the Connect code of an error of kind (one of errdefs' kinds);
// CodeUnknown for nil or another error.
func Code(kind error) connect.Code {
	for _, k := range kinds {
		if k.kind == kind {
			return k.code
		}
	}
	return connect.CodeUnknown
}

// KindName is kind's name on the wire, "" for nil or another error.
func KindName(kind error) string {
	for _, k := range kinds {
		if k.kind == kind {
			return k.name
		}
	}
	return ""
}

// kindOf returns the errdefs kind named name, else the kind of code.
func kindOf(name string, code connect.Code) error {
	for _, k := range kinds {
		if name != "" && k.name == name {
			return k.kind
		}
	}
	if name != "" {
		return nil
	}
	for _, k := range kinds {
		if k.code == code {
			return k.kind
		}
	}
	switch code {
	case connect.CodeDeadlineExceeded, connect.CodeCanceled, connect.CodeResourceExhausted:
		return errdefs.ErrUnavailable
	case connect.CodeUnauthenticated:
		return errdefs.ErrPermissionDenied
	case connect.CodeUnimplemented, connect.CodeOutOfRange:
		return errdefs.ErrFailedPrecondition
	}
	return nil
}

// Detail is err as an ErrorDetail that says it happened on host (this
// host's name; empty when unknown).
func Detail(err error, host string) *hostv1.ErrorDetail {
	d := &hostv1.ErrorDetail{Kind: KindName(errdefs.KindOf(err)), Message: err.Error(), Host: host}
	// An error that came from another host keeps the name of that host.
	var remote *Error
	if errors.As(err, &remote) && remote.Host != "" {
		d.Host = remote.Host
	}
	for _, r := range errdefs.Remedies(err) {
		d.Remedies = append(d.Remedies, &hostv1.Remedy{Action: string(r.Action), Args: r.Args, Note: r.Note, Where: r.Where})
	}
	return d
}

// ToConnect turns err into the Connect error a handler returns: the code
// of its kind, its message, and its detail. host is this host's name. A
// Connect error passes unchanged; nil stays nil.
func ToConnect(err error, host string) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	out := connect.NewError(Code(errdefs.KindOf(err)), errors.New(err.Error()))
	if d, derr := connect.NewErrorDetail(Detail(err, host)); derr == nil {
		out.AddDetail(d)
	}
	return out
}

// Error is a failure reported by a vtpm service: its kind, message and
// remedies as the service sent them. It matches its kind with errors.Is and
// offers its remedies (errdefs.Remedier).
type Error struct {
	Code connect.Code
	Kind error  // one of errdefs' kinds, or nil
	Host string // the host where it happened, when known
	Msg  string
	Fix  []errdefs.Remedy
}

func (e *Error) Error() string { return e.Msg }

// Is matches the error's kind.
func (e *Error) Is(target error) bool { return e.Kind != nil && target == e.Kind }

// Remedies returns the ways out the service sent.
func (e *Error) Remedies() []errdefs.Remedy { return e.Fix }

// Detailed reports whether err is a Connect error that carries an
// ErrorDetail: a vtpm service answered with it (rather than the call
// failing on its way).
func Detailed(err error) bool {
	var ce *connect.Error
	return errors.As(err, &ce) && detailOf(ce) != nil
}

// detailOf is the ErrorDetail ce carries, or nil.
func detailOf(ce *connect.Error) *hostv1.ErrorDetail {
	for _, d := range ce.Details() {
		if v, err := d.Value(); err == nil {
			if ed, ok := v.(*hostv1.ErrorDetail); ok {
				return ed
			}
		}
	}
	return nil
}

// FromConnect turns an error a Connect client returned into an *Error;
// other errors pass unchanged. where, when set, says where the service's
// remedies run (such as "on host b"): it replaces a remedy's empty or
// "here" Where, since the service's "here" is not the reader's. The
// service's own local API passes "".
func FromConnect(err error, where string) error {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err
	}
	out := &Error{Code: ce.Code(), Msg: ce.Message()}
	detail := detailOf(ce)
	if detail == nil {
		out.Kind = kindOf("", ce.Code())
		if out.Msg == "" {
			out.Msg = ce.Error()
		}
		return out
	}
	out.Kind = kindOf(detail.GetKind(), ce.Code())
	out.Host = detail.GetHost()
	if detail.GetMessage() != "" {
		out.Msg = detail.GetMessage()
	}
	for _, r := range detail.GetRemedies() {
		fix := errdefs.Remedy{Action: errdefs.Action(r.GetAction()), Note: r.GetNote(), Where: r.GetWhere()}
		if len(r.GetArgs()) > 0 {
			fix.Args = r.GetArgs()
		}
		if where != "" && (fix.Where == "" || fix.Where == "here") {
			fix.Where = where
		}
		out.Fix = append(out.Fix, fix)
	}
	return out
}
