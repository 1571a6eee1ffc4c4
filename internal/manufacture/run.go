package manufacture

import (
	"fmt"
	"slices"
	"strings"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/libtpms"
)

// Manufacture starts libtpms on st (a fresh TPM when st holds no state),
// provisions it as o says, allocates the PCR banks, and shuts it down
// orderly so the state is complete on disk. The process must not have
// another libtpms TPM open.
func Manufacture(st libtpms.Storage, o Options) (rep *Report, err error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	tpm, err := libtpms.Open(st)
	if err != nil {
		return nil, err
	}
	defer tpm.Close()
	if err := start(tpm); err != nil {
		return nil, err
	}
	rep, err = Provision(tpm, o)
	if err != nil {
		return nil, err
	}
	if rep.Available, rep.PCRBanks, err = Banks(tpm); err != nil {
		return nil, err
	}
	if o.PCRBanks != nil && !sameBanks(rep.PCRBanks, o.PCRBanks) {
		if _, err := AllocatePCRs(tpm, o.PCRBanks); err != nil {
			return nil, err
		}
		// The allocation takes effect at the next TPM reset.
		if err := shutdown(tpm); err != nil {
			return nil, err
		}
		tpm.Terminate()
		if err := start(tpm); err != nil {
			return nil, err
		}
		if _, rep.PCRBanks, err = Banks(tpm); err != nil {
			return nil, err
		}
		if !sameBanks(rep.PCRBanks, o.PCRBanks) {
			return nil, fmt.Errorf("PCR banks after TPM2_PCR_Allocate and a reset are %s, want %s", strings.Join(rep.PCRBanks, ","), strings.Join(o.PCRBanks, ","))
		}
	}
	if err := shutdown(tpm); err != nil {
		return nil, err
	}
	tpm.Terminate()
	return rep, nil
}

func sameBanks(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

func start(tpm *libtpms.TPM) error {
	if err := tpm.Init(); err != nil {
		return fmt.Errorf("start libtpms: %w", err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		return fmt.Errorf("TPM2_Startup(CLEAR): %w", err)
	}
	return nil
}

func shutdown(tpm *libtpms.TPM) error {
	if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		return fmt.Errorf("TPM2_Shutdown(CLEAR): %w", err)
	}
	return nil
}
