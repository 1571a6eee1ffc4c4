package keyservice

import (
	"fmt"
	"strings"
	"time"

	"vtpm/internal/errdefs"
)

// DenialReason says why a key was not released.
type DenialReason string

// Denial reasons; the metrics and the audit log use them as they are.
const (
	DenyNotRegistered  DenialReason = "not-registered"        // no host of that name is registered
	DenyRevoked        DenialReason = "revoked"               // the host was revoked
	DenyNoHealth       DenialReason = "no-health-certificate" // the host has not attested
	DenyHealthExpired  DenialReason = "health-expired"        // its health certificate expired
	DenyHealthInvalid  DenialReason = "health-invalid"        // not issued by this service for this host, or superseded
	DenyNotInGroup     DenialReason = "not-in-group"          // the VM's policy names groups the host is not in
	DenyNoFleetRow     DenialReason = "no-fleet-row"          // the protector admits no fleet guardian of this service
	DenyBadProtector   DenialReason = "bad-protector"         // the protector does not verify
	DenyAttestation    DenialReason = "attestation-failed"    // the host's attestation failed (facts in Detail)
	DenyNotInitialized DenialReason = "not-initialized"       // the service has no fleet guardian yet
)

// DenialError is a refused request of a host: which host, which TPM, why,
// and the facts (the groups the VM's policy allows, when the health
// certificate expired). It matches errdefs.ErrPermissionDenied, or
// errdefs.ErrFailedPrecondition for a health certificate to renew.
type DenialError struct {
	Host     string
	TPM      string
	Reason   DenialReason
	Groups   []string  // DenyNotInGroup: the groups that may run the VM
	NotAfter time.Time // DenyHealthExpired
	Detail   string
}

func (e *DenialError) Error() string {
	var b strings.Builder
	what := "key release"
	if e.TPM != "" {
		what = "key release for TPM " + e.TPM
	}
	fmt.Fprintf(&b, "%s to host %s denied: ", what, e.Host)
	switch e.Reason {
	case DenyNotRegistered:
		b.WriteString("the host is not registered")
	case DenyRevoked:
		b.WriteString("the host is revoked")
	case DenyNoHealth:
		b.WriteString("no health certificate (the host has not attested)")
	case DenyHealthExpired:
		fmt.Fprintf(&b, "the health certificate expired at %s", e.NotAfter.UTC().Format(time.RFC3339))
	case DenyHealthInvalid:
		b.WriteString("the health certificate is not valid for this host")
	case DenyNotInGroup:
		fmt.Fprintf(&b, "host not in group %s", strings.Join(e.Groups, " or "))
	case DenyNoFleetRow:
		b.WriteString("the key protector has no row for this service's fleet guardian")
	case DenyBadProtector:
		b.WriteString("the key protector does not verify")
	case DenyAttestation:
		b.WriteString("attestation failed")
	case DenyNotInitialized:
		b.WriteString("the key service has no fleet guardian yet")
	default:
		b.WriteString(string(e.Reason))
	}
	if e.Detail != "" {
		b.WriteString(": " + e.Detail)
	}
	return b.String()
}

// Is reports whether target is the error's kind.
func (e *DenialError) Is(target error) bool {
	switch e.Reason {
	case DenyHealthExpired, DenyNoHealth:
		return target == errdefs.ErrFailedPrecondition
	case DenyNotInitialized:
		return target == errdefs.ErrFailedPrecondition
	}
	return target == errdefs.ErrPermissionDenied
}

// Remedies says who can change the outcome: the admin actions run where
// the key service's admin bundle is.
func (e *DenialError) Remedies() []errdefs.Remedy {
	const admin = "an admin of the key service"
	switch e.Reason {
	case DenyNotRegistered:
		return []errdefs.Remedy{errdefs.Do(errdefs.ActionKeyServiceHostAdd, "host", e.Host).On(admin).WithNote("register the host")}
	case DenyRevoked:
		return []errdefs.Remedy{errdefs.Advise("a revoked host stays refused; an admin may remove it and register it again")}
	case DenyNoHealth, DenyHealthExpired, DenyHealthInvalid:
		return []errdefs.Remedy{errdefs.Advise("attest the host again to get a new health certificate")}
	case DenyNotInGroup:
		fix := []errdefs.Remedy{errdefs.Advise("have an admin of the key service register host %s in group %s", e.Host, strings.Join(e.Groups, " or "))}
		if e.TPM != "" {
			fix = append(fix, errdefs.Do(errdefs.ActionKeyServiceVMPolicy, "tpm", e.TPM).On(admin).WithNote("or let the host's group run the VM"))
		}
		return fix
	case DenyNoFleetRow:
		return []errdefs.Remedy{errdefs.Do(errdefs.ActionProtectorGrant, "tpm", e.TPM).On("the TPM's owner").
			WithNote("grant the fleet guardian (the key service's fleet-guardian certificates)")}
	case DenyNotInitialized:
		return []errdefs.Remedy{errdefs.Do(errdefs.ActionKeyServiceInit).On("a key service node")}
	}
	return nil
}
