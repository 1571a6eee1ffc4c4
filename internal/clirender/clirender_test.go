package clirender

import (
	"fmt"
	"testing"

	"vtpm/internal/errdefs"
)

func TestError(t *testing.T) {
	inner := errdefs.New(errdefs.ErrFailedPrecondition, "VM web is running").
		With(errdefs.Do(errdefs.ActionVMStop, "vm", "web").WithNote("stop it first"))
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"plain", fmt.Errorf("boom"), "boom"},
		{"wrapped action", fmt.Errorf("delete web: %w", inner), "delete web: VM web is running\n  fix: stop it first: `vtpm vm stop web`"},
		{"missing argument becomes a placeholder", errdefs.New(errdefs.ErrNotFound, "no key").With(errdefs.Do(errdefs.ActionKeyImport, "replace", "true")),
			"no key\n  fix: `vtpm key import FILE --replace`"},
		{"certs only, elsewhere", errdefs.New(errdefs.ErrNotFound, "x").With(errdefs.Do(errdefs.ActionGuardianExportCerts, "file", "host.pem").On("here")),
			"x\n  fix: `vtpm guardian export --certs-only -o host.pem` (here)"},
		{"advice alone", errdefs.New(errdefs.ErrDataLoss, "damaged").With(errdefs.Advise("restore it from a backup")),
			"damaged\n  fix: restore it from a backup"},
		{"another host", errdefs.New(errdefs.ErrPermissionDenied, "refused").With(errdefs.Do(errdefs.ActionHostTrust, "name", "a", "address", "10.0.0.1:7443", "certs", "a.pem").On("on host b")),
			"refused\n  fix: `vtpm host trust a 10.0.0.1:7443 a.pem` (on host b)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Error(tt.err); got != tt.want {
				t.Errorf("Error = %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestEveryActionHasACommand(t *testing.T) {
	for _, a := range []errdefs.Action{errdefs.ActionDoctor, errdefs.ActionSandboxProbe, errdefs.ActionGuardianList, errdefs.ActionGuardianExport, errdefs.ActionGuardianExportCerts, errdefs.ActionGuardianImport, errdefs.ActionGuardianTrust,
		errdefs.ActionProtectorGrant, errdefs.ActionProtectorShow, errdefs.ActionKeyExport, errdefs.ActionKeyImport, errdefs.ActionTPMReprovision, errdefs.ActionTPMAdd,
		errdefs.ActionTPMRemove, errdefs.ActionTPMEnable, errdefs.ActionTPMManufacture, errdefs.ActionStateImport, errdefs.ActionVMStop, errdefs.ActionVMList,
		errdefs.ActionVMRegister, errdefs.ActionVMUnregister, errdefs.ActionVMClone, errdefs.ActionVMCreate, errdefs.ActionVMTemplate,
		errdefs.ActionVMDeploy, errdefs.ActionIsolationPreferred, errdefs.ActionRunAsOwner,
		errdefs.ActionHostAllowPath, errdefs.ActionHostServiceStart, errdefs.ActionHostServe,
		errdefs.ActionHostTrust, errdefs.ActionHostUntrust, errdefs.ActionHostList, errdefs.ActionHostServeListen, errdefs.ActionBuild,
		errdefs.ActionKeyServiceHostAdd, errdefs.ActionKeyServiceVMPolicy, errdefs.ActionKeyServiceStatus, errdefs.ActionKeyServiceInit,
		errdefs.ActionVMMoveGrant, errdefs.ActionVMCopyGrant,
		errdefs.ActionVMMigrateGrant} {
		if _, ok := Commands[a]; !ok {
			t.Errorf("action %q has no command line", a)
		}
	}
}
