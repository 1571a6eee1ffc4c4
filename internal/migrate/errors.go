package migrate

import (
	"errors"
	"fmt"
	"strings"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
)

// Step names a step of a migration.
type Step string

// The steps, in order.
const (
	StepPreflight Step = "pre-flight"
	StepGrant     Step = "grant"
	StepPrepare   Step = "prepare the destination"
	StepTLS       Step = "TLS credentials"
	StepDisks     Step = "copy the disks"
	StepMemory    Step = "migrate memory and devices"
	StepCommit    Step = "commit on the destination"
	StepRetire    Step = "retire the VM here"
)

// StepError is a migration that failed at Step. Unless Retire failed (the
// VM then runs on the destination and this host kept its files), the VM
// keeps running here as before and the destination was cleaned up.
type StepError struct {
	VM, Host string
	Step     Step
	Err      error
	// CleanupErr is what went wrong undoing the migration, if anything;
	// DestinationLeft says the destination could not be told to clean up
	// (its host service then removes what it prepared when it starts).
	CleanupErr      error
	DestinationLeft bool
}

func (e *StepError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "migrate VM %s to %s: %s failed: %v", e.VM, e.Host, e.Step, e.Err)
	if e.Step == StepRetire {
		fmt.Fprintf(&b, "\nThe VM runs on %s now; its files stay here.", e.Host)
	} else if e.DestinationLeft {
		fmt.Fprintf(&b, "\nThe VM keeps running here; %s did not answer the request to clean up (nothing is registered there; its host service removes what it prepared when it runs again).", e.Host)
	} else {
		fmt.Fprintf(&b, "\nThe VM keeps running here; nothing is left on %s.", e.Host)
	}
	if e.CleanupErr != nil {
		fmt.Fprintf(&b, "\nUndoing the migration: %v", e.CleanupErr)
	}
	return b.String()
}

func (e *StepError) Unwrap() error { return e.Err }

// Remedies are the failure's own.
func (e *StepError) Remedies() []errdefs.Remedy { return errdefs.Remedies(e.Err) }

// PreflightError is a migration the pre-flight checks refused; nothing was
// started on either host. Refusal holds the problems (a destination's are
// a *vm.IncomingError). When the TPM's key protector does not admit the
// destination's guardian, Guardian names it and the remedies offer the
// grant.
type PreflightError struct {
	VM, Host string
	// Guardian is the destination's guardian ("name (fingerprint)") the
	// protector does not admit; "" when that is not the problem.
	Guardian string
	// Fleet names the rows of the protector ("name (fingerprint …)") of
	// guardians that are no host's, such as a key service's fleet
	// guardian: a destination registered and attested with that key
	// service gets the key from it, without a grant.
	Fleet   []string
	Refusal error
}

func (e *PreflightError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "VM %s cannot migrate to %s (nothing was started; the VM keeps running here)", e.VM, e.Host)
	if e.Guardian != "" {
		fmt.Fprintf(&b, ":\nthe TPM's key protector does not admit %s's guardian %s", e.Host, e.Guardian)
		if len(e.Fleet) > 0 {
			fmt.Fprintf(&b, "; it admits %s, which is no host's guardian (a key service's fleet guardian?)", strings.Join(e.Fleet, ", "))
		}
	}
	fmt.Fprintf(&b, ":\n%v", e.Refusal)
	return b.String()
}

func (e *PreflightError) Unwrap() error { return e.Refusal }

// Is matches errdefs.ErrFailedPrecondition.
func (e *PreflightError) Is(target error) bool { return target == errdefs.ErrFailedPrecondition }

// Remedies: the grant first when the protector is the problem, then the
// problems' own (those of a key that does not open are for the destination).
func (e *PreflightError) Remedies() []errdefs.Remedy {
	var rs []errdefs.Remedy
	if e.Guardian != "" {
		// The owner is here: granting is the way; the destination's other
		// ways out (importing a guardian or the key) are for hosts the
		// owner cannot reach.
		rs = append(rs, errdefs.Do(errdefs.ActionVMMigrateGrant, "vm", e.VM, "host", e.Host).
			WithNote("admit %s's guardian to the TPM's key protector, as its owner, and migrate", e.Host))
		if len(e.Fleet) > 0 {
			rs = append(rs, errdefs.Do(errdefs.ActionKeyServiceHostAdd, "host", e.Host).On("the key service, as its admin").
				WithNote("or, when %s is your key service's fleet guardian: register %s with the key service and attest it there, so that it gets the key from the key service", strings.Join(e.Fleet, " or "), e.Host))
		}
	}
	for _, r := range errdefs.Remedies(e.Refusal) {
		if e.Guardian != "" && !missingKeyRemedy(r) {
			continue
		}
		if r.Where == "" {
			r = r.On(e.Host) // the destination's problems are fixed there
		}
		rs = append(rs, r)
	}
	return rs
}

// missingKeyRemedy keeps, beside the grant, the remedies of problems
// other than the key: none of MissingKeyError's.
func missingKeyRemedy(r errdefs.Remedy) bool {
	for _, m := range (&keybroker.MissingKeyError{}).Remedies() {
		if m.Action == r.Action {
			return false
		}
	}
	return true
}

// hostGuardianPrefix starts the name of every host's guardian (keybroker
// names it "host:" and the host's name).
const hostGuardianPrefix = "host:"

// fleetRows names the rows of protector (JSON) a key service may open:
// the row of the fleet guardian this host's service knows (dataRoot's
// hostsvc.FleetFile), or else those of guardians that are no host's (a
// host's guardian is named "host:NAME", a fleet guardian is not).
func fleetRows(dataRoot string, protector []byte) []string {
	p, err := guardian.ParseProtector(protector)
	if err != nil {
		return nil
	}
	name := func(r guardian.Row) string { return fmt.Sprintf("%s (fingerprint %s)", r.Name, r.Fingerprint) }
	if r, ok := hostsvc.FleetRow(dataRoot, p.Rows()); ok {
		return []string{name(r)}
	}
	var names []string
	for _, r := range p.Rows() {
		if !strings.HasPrefix(r.Name, hostGuardianPrefix) {
			names = append(names, name(r))
		}
	}
	return names
}

// missingKey reports whether err says no guardian opens the TPM's key.
func missingKey(err error) bool {
	var mk *keybroker.MissingKeyError
	return errors.As(err, &mk)
}
