package hostcheck

import (
	"context"

	"vtpm/internal/errdefs"
)

// Status is the outcome of a check.
type Status string

// Statuses. Missing means a vTPM or VM cannot run as it should; Warning
// means it runs, with less than the host could give it.
const (
	OK      Status = "ok"
	Warning Status = "warning"
	Missing Status = "missing"
)

// Check is one finding about the host.
type Check struct {
	Name   string           `json:"name"`
	Status Status           `json:"status"`
	Detail string           `json:"detail"`
	Fix    []errdefs.Remedy `json:"fix,omitempty"`
}

func ok(name, detail string) Check { return Check{Name: name, Status: OK, Detail: detail} }

func warn(name, detail string, fix ...errdefs.Remedy) Check {
	return Check{Name: name, Status: Warning, Detail: detail, Fix: fix}
}

func missing(name, detail string, fix ...errdefs.Remedy) Check {
	return Check{Name: name, Status: Missing, Detail: detail, Fix: fix}
}

// advise is a remedy of prose alone; shell commands other than vtpm's are
// prose too.
var advise = errdefs.Advise

// Options say which host to check.
type Options struct {
	// DataRoot is vtpm's data root.
	DataRoot string
	// HostTPM selects the host TPM the keystore is sealed to
	// ($VTPM_HOST_TPM).
	HostTPM string
	// Exe is the vtpm executable that runs the sandbox probe (its
	// ProbeArgs); empty skips the probe and reports the sandbox missing.
	Exe string
	// HostSocket is the host service's socket; empty: its default.
	HostSocket string
}

// Run checks everything, in the order `vtpm doctor` prints it.
func Run(ctx context.Context, o Options) []Check {
	var cs []Check
	cs = append(cs, SandboxChecks(ctx, o.Exe)...)
	cs = append(cs, UserCheck(), NamespaceCheck(), MemlockCheck(), KVMCheck())
	cs = append(cs, QEMUChecks(ctx)...)
	cs = append(cs, QEMUConfinementCheck(ctx))
	cs = append(cs, FirmwareCheck(), KeystoreCheck(o.DataRoot, o.HostTPM), RollbackCheck(o.DataRoot, o.HostTPM), DataRootCheck(o.DataRoot))
	cs = append(cs, HostServiceCheck(o.HostSocket))
	return cs
}

// Failed counts the checks that are missing.
func Failed(cs []Check) int {
	n := 0
	for _, c := range cs {
		if c.Status == Missing {
			n++
		}
	}
	return n
}
