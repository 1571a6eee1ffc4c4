// Package errdefs is vtpm's vocabulary of failures as data: a closed set of
// kinds that every front end (the CLI, the host service's API, a console)
// maps one to one to its own codes, and remedies that say the way out as an
// action with arguments rather than as a command line.
//
// Domain errors keep their facts in fields (which TPM, which guardians, which
// file), match one kind with errors.Is, and offer their remedies through
// [Remedier]. Front ends walk the chain with [KindOf] and [Remedies]; they
// never parse messages.
package errdefs

import (
	"errors"
	"fmt"
	"maps"
	"slices"
)

// Kinds. Every error a vtpm library returns for a condition a user can act
// on matches exactly one of them with errors.Is.
var (
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrNotFound           = errors.New("not found")
	ErrAlreadyExists      = errors.New("already exists")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrConflict           = errors.New("conflict")
	ErrUnavailable        = errors.New("unavailable")
	ErrDataLoss           = errors.New("data loss") // damaged, tampered or rolled-back state
	ErrInternal           = errors.New("internal error")
)

var kinds = []error{
	ErrInvalidArgument, ErrNotFound, ErrAlreadyExists, ErrPermissionDenied,
	ErrFailedPrecondition, ErrConflict, ErrUnavailable, ErrDataLoss, ErrInternal,
}

// KindOf returns the kind err matches, or nil when it matches none.
func KindOf(err error) error {
	for _, k := range kinds {
		if errors.Is(err, k) {
			return k
		}
	}
	return nil
}

// Action names an operation a user (or a console) can perform to resolve a
// failure. Front ends render it: the CLI as a command line, a console as a
// button. The arguments an action takes are documented at its constant.
type Action string

// Actions.
const (
	// ActionDoctor reports what the host provides and how to fix it.
	ActionDoctor Action = "host.doctor"
	// ActionSandboxProbe confines a process as an instance and reports
	// what it can still do (args: state, its scratch state directory).
	ActionSandboxProbe Action = "host.doctor.probe-sandbox"
	// ActionGuardianList lists the guardians this host holds.
	ActionGuardianList Action = "guardian.list"
	// ActionGuardianExport exports a guardian with its private keys where it
	// lives (args: guardian, file).
	ActionGuardianExport Action = "guardian.export"
	// ActionGuardianExportCerts exports this host's guardian's public
	// certificates (args: file).
	ActionGuardianExportCerts Action = "guardian.export-certs"
	// ActionGuardianImport imports a guardian's PKCS#12 file (args: file).
	ActionGuardianImport Action = "guardian.import"
	// ActionGuardianTrust makes this host trust the TPMs a guardian owns,
	// given by its public certificates (args: certs).
	ActionGuardianTrust Action = "guardian.trust"
	// ActionProtectorGrant admits guardians to a TPM's key protector, on a
	// host that can open it (args: tpm, certs).
	ActionProtectorGrant Action = "protector.grant"
	// ActionProtectorShow shows the guardians a TPM's key protector admits
	// (args: tpm).
	ActionProtectorShow Action = "protector.show"
	// ActionKeyExport exports a TPM's data key (args: tpm, file).
	ActionKeyExport Action = "key.export"
	// ActionKeyImport imports a TPM's exported data key (args: file;
	// replace: "true" to replace the one held).
	ActionKeyImport Action = "key.import"
	// ActionTPMReprovision sets a TPM's policy to provision a fresh TPM,
	// keeping the old state as a backup, when its key is gone (args: tpm).
	ActionTPMReprovision Action = "tpm.policy.reprovision"
	// ActionTPMAdd, ActionTPMRemove and ActionTPMEnable change a VM's TPM
	// (args: vm).
	ActionTPMAdd    Action = "tpm.add"
	ActionTPMRemove Action = "tpm.remove"
	ActionTPMEnable Action = "tpm.enable"
	// ActionTPMManufacture manufactures a TPM in a state directory (args:
	// dir).
	ActionTPMManufacture Action = "tpm.manufacture"
	// ActionStateImport converts swtpm's state files to sealed state
	// (args: dir).
	ActionStateImport Action = "state.import"
	// ActionVMStop stops a running VM (args: vm).
	ActionVMStop Action = "vm.stop"
	// ActionVMList lists the VMs registered on this host.
	ActionVMList Action = "vm.list"
	// ActionVMRegister registers a bundle (args: path).
	ActionVMRegister Action = "vm.register"
	// ActionVMUnregister unregisters a VM (args: vm).
	ActionVMUnregister Action = "vm.unregister"
	// ActionVMClone copies a VM with its own identity (args: vm, new).
	ActionVMClone Action = "vm.clone"
	// ActionVMCreate creates a VM (args: os).
	ActionVMCreate Action = "vm.create"
	// ActionVMTemplate turns a VM into a template (args: vm, new).
	ActionVMTemplate Action = "vm.template"
	// ActionVMDeploy makes a VM from a template (args: template, new).
	ActionVMDeploy Action = "vm.deploy"
	// ActionIsolationPreferred relaxes a VM's or an instance's isolation
	// policy to "preferred" (args: vm, when a VM's).
	ActionIsolationPreferred Action = "isolation.preferred"
	// ActionHostAllowPath allows this host's VMs to use a host file,
	// directory or device outside their bundles (args: path).
	ActionHostAllowPath Action = "host.allow-path"
	// ActionRunAsOwner runs vtpm as the user who owns a file or directory
	// (args: path; user when known).
	ActionRunAsOwner Action = "run-as-owner"
	// ActionHostServiceStart starts this host's host service, which opens
	// keys for vTPMs that cannot open the keystore themselves.
	ActionHostServiceStart Action = "host.service.start"
	// ActionHostServe runs the host service in the foreground (args:
	// socket, when not the default).
	ActionHostServe Action = "host.serve"
	// ActionHostTrust admits a peer host: it may call this host's API and
	// its guardian is trusted as an owner (args: name, address, certs).
	ActionHostTrust Action = "host.trust"
	// ActionHostUntrust withdraws a peer's admission (args: name).
	ActionHostUntrust Action = "host.untrust"
	// ActionHostList lists the peer hosts with their state.
	ActionHostList Action = "host.list"
	// ActionHostServeListen runs the host service with its API on a TCP
	// address (args: address).
	ActionHostServeListen Action = "host.serve.listen"
	// ActionBuild builds vtpm's executables from its source tree.
	ActionBuild Action = "build"
	// ActionKeyServiceHostAdd registers a host with the key service (args:
	// host).
	ActionKeyServiceHostAdd Action = "keyservice.host.add"
	// ActionKeyServiceVMPolicy sets which host groups may run a TPM's VM
	// (args: tpm).
	ActionKeyServiceVMPolicy Action = "keyservice.vm-policy.set"
	// ActionKeyServiceStatus shows the key service's members and quorum.
	ActionKeyServiceStatus Action = "keyservice.status"
	// ActionKeyServiceInit creates the key service's fleet guardian.
	ActionKeyServiceInit Action = "keyservice.init"
	// ActionVMMoveGrant moves a VM to another host after admitting that
	// host's guardian to its TPM's key protector (args: vm, to).
	ActionVMMoveGrant Action = "vm.move.grant"
	// ActionVMCopyGrant copies a VM with its TPM to another host after
	// admitting that host's guardian to the TPM's key protector (args: vm,
	// to, name).
	ActionVMCopyGrant Action = "vm.copy.grant"
	// ActionVMMigrateGrant migrates a VM to another host after admitting
	// that host's guardian to the TPM's key protector (args: vm, host).
	ActionVMMigrateGrant Action = "vm.migrate.grant"
)

// Remedy is one way out of a failure. Action, when set, is the operation to
// perform with Args; Note is prose that goes with it (or, without an Action,
// the whole remedy, such as "restore it from a backup"). Where says on which
// host the action runs when not on this one.
type Remedy struct {
	Action Action            `json:"action,omitempty"`
	Args   map[string]string `json:"args,omitempty"`
	Note   string            `json:"note,omitempty"`
	Where  string            `json:"where,omitempty"`
}

// Do returns a remedy that performs action with args given as name, value
// pairs.
func Do(action Action, args ...string) Remedy {
	if len(args)%2 != 0 {
		panic("errdefs.Do: odd number of arguments")
	}
	r := Remedy{Action: action}
	if len(args) > 0 {
		r.Args = make(map[string]string, len(args)/2)
		for i := 0; i < len(args); i += 2 {
			r.Args[args[i]] = args[i+1]
		}
	}
	return r
}

// Advise returns a remedy of prose alone.
func Advise(format string, a ...any) Remedy { return Remedy{Note: fmt.Sprintf(format, a...)} }

// WithNote returns r with its note set.
func (r Remedy) WithNote(format string, a ...any) Remedy {
	r.Note = fmt.Sprintf(format, a...)
	return r
}

// On returns r to be run on another host, described by where.
func (r Remedy) On(where string) Remedy {
	r.Where = where
	return r
}

// Equal reports whether r and o are the same remedy.
func (r Remedy) Equal(o Remedy) bool {
	return r.Action == o.Action && r.Note == o.Note && r.Where == o.Where && maps.Equal(r.Args, o.Args)
}

// Remedier is implemented by errors that know the ways out of them.
type Remedier interface {
	Remedies() []Remedy
}

// Remedies collects the remedies of every error in err's chain, outermost
// first, without repeats.
func Remedies(err error) []Remedy {
	var out []Remedy
	walk(err, func(e error) {
		if r, ok := e.(Remedier); ok {
			for _, x := range r.Remedies() {
				if !slices.ContainsFunc(out, x.Equal) {
					out = append(out, x)
				}
			}
		}
	})
	return out
}

func walk(err error, f func(error)) {
	if err == nil {
		return
	}
	f(err)
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		walk(u.Unwrap(), f)
	case interface{ Unwrap() []error }:
		for _, e := range u.Unwrap() {
			walk(e, f)
		}
	}
}

// Error is a failure of a given kind with its facts in Msg, an optional
// cause and the ways out. Packages with richer facts define their own types
// (with fields) and implement Remedier and Is; Error serves the rest.
type Error struct {
	Kind error  // one of the kinds above
	Msg  string // what failed, with its facts
	Err  error  // the cause, or nil
	Fix  []Remedy
}

func (e *Error) Error() string {
	if e.Err == nil {
		return e.Msg
	}
	if e.Msg == "" {
		return e.Err.Error()
	}
	return e.Msg + ": " + e.Err.Error()
}

// Unwrap returns the kind and the cause.
func (e *Error) Unwrap() []error {
	if e.Err == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Err}
}

// Remedies returns the ways out.
func (e *Error) Remedies() []Remedy { return e.Fix }

// New returns an Error of kind with a formatted message.
func New(kind error, format string, a ...any) *Error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, a...)}
}

// Wrap returns an Error of kind with a formatted message and cause err.
func Wrap(kind, err error, format string, a ...any) *Error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, a...), Err: err}
}

// With adds remedies to e and returns it.
func (e *Error) With(fix ...Remedy) *Error {
	e.Fix = append(e.Fix, fix...)
	return e
}
