// Package clirender renders errors for a terminal: an error's message, then
// its remedies (errdefs.Remedy) one per line, each action written as the
// command line that performs it. Every executable of vtpm (vtpm,
// vtpm-hostd, vtpm-keyservice) renders through it, so a failure reads the
// same whichever one reports it, and whether it happened here or on
// another host (errors that crossed the API keep their remedies).
//
// It is linked into every vTPM start: it must stay small and allocate
// nothing at initialisation.
package clirender

import (
	"fmt"
	"regexp"
	"strings"
	"sync"

	"vtpm/internal/errdefs"
)

// Commands renders each remedy action as the command line that performs
// it; {name} is the action's argument of that name. A new errdefs.Action
// needs its template here (TestEveryActionHasACommand).
var Commands = map[errdefs.Action]string{
	errdefs.ActionDoctor:              "vtpm doctor",
	errdefs.ActionSandboxProbe:        "vtpm doctor --probe-sandbox --state {state}",
	errdefs.ActionGuardianList:        "vtpm guardian list",
	errdefs.ActionGuardianExport:      "vtpm guardian export {guardian} -o {file}",
	errdefs.ActionGuardianExportCerts: "vtpm guardian export --certs-only -o {file}",
	errdefs.ActionGuardianImport:      "vtpm guardian import {file}",
	errdefs.ActionGuardianTrust:       "vtpm guardian trust {certs}",
	errdefs.ActionProtectorGrant:      "vtpm protector grant {tpm} {certs}",
	errdefs.ActionProtectorShow:       "vtpm protector show {tpm}",
	errdefs.ActionKeyExport:           "vtpm key export {tpm} -o {file}",
	errdefs.ActionKeyImport:           "vtpm key import {file}",
	errdefs.ActionTPMReprovision:      "vtpm tpm policy {tpm} --on-missing-key reprovision",
	errdefs.ActionTPMAdd:              "vtpm tpm add {vm}",
	errdefs.ActionTPMRemove:           "vtpm tpm remove {vm}",
	errdefs.ActionTPMEnable:           "vtpm tpm enable {vm}",
	errdefs.ActionTPMManufacture:      "vtpm tpm manufacture {dir}",
	errdefs.ActionStateImport:         "vtpm state import {dir}",
	errdefs.ActionVMStop:              "vtpm vm stop {vm}",
	errdefs.ActionVMList:              "vtpm vm list -a",
	errdefs.ActionVMRegister:          "vtpm vm register {path}",
	errdefs.ActionVMUnregister:        "vtpm vm unregister {vm}",
	errdefs.ActionVMClone:             "vtpm vm clone {vm} {new}",
	errdefs.ActionVMCreate:            "vtpm vm create NEW --os {os} --firmware uefi --disk DISK --tpm",
	errdefs.ActionVMTemplate:          "vtpm vm template {vm} {new}",
	errdefs.ActionVMDeploy:            "vtpm vm deploy {template} {new}",
	errdefs.ActionIsolationPreferred:  "--isolation preferred",
	errdefs.ActionHostAllowPath:       "vtpm host allow-path {path}",
	errdefs.ActionRunAsOwner:          "run vtpm as the owner of {path} (usually root: sudo)",
	errdefs.ActionHostServiceStart:    "systemctl start vtpm-host.socket",
	errdefs.ActionHostServe:           "vtpm host serve --socket {socket}",
	errdefs.ActionHostTrust:           "vtpm host trust {name} {address} {certs}",
	errdefs.ActionHostUntrust:         "vtpm host untrust {name}",
	errdefs.ActionHostList:            "vtpm host list",
	errdefs.ActionHostServeListen:     "vtpm host serve --listen {address}",
	errdefs.ActionBuild:               "make build",
	errdefs.ActionKeyServiceHostAdd:   "vtpm keyservice host add {host} --mode key --guardian CERTS.pem",
	errdefs.ActionKeyServiceVMPolicy:  "vtpm keyservice vm-policy set {tpm} --group {group}",
	errdefs.ActionKeyServiceStatus:    "vtpm keyservice status",
	errdefs.ActionKeyServiceInit:      "vtpm keyservice init",
	errdefs.ActionVMMoveGrant:         "vtpm vm move {vm} --to {to} --grant",
	errdefs.ActionVMCopyGrant:         "vtpm vm copy {vm} --to {to} --name {name} --tpm copy --grant",
	errdefs.ActionVMMigrateGrant:      "vtpm vm migrate {vm} --to {host} --grant",
}

// Compiled on first use: every vTPM start runs this package's initialisation.
var placeholder = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`\{([a-z-]+)\}`) })

// Command renders r's action as a command line; arguments the remedy does
// not give stay as upper-case placeholders (FILE, NEW).
func Command(r errdefs.Remedy) string {
	tmpl, ok := Commands[r.Action]
	if !ok {
		return string(r.Action)
	}
	s := placeholder().ReplaceAllStringFunc(tmpl, func(m string) string {
		name := m[1 : len(m)-1]
		if v, ok := r.Args[name]; ok && v != "" {
			return v
		}
		return strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
	})
	if r.Action == errdefs.ActionKeyImport && r.Args["replace"] == "true" {
		s += " --replace"
	}
	return s
}

// Remedy is one remedy as a line of prose with its command in backquotes,
// the way vtpm's messages have always put them.
func Remedy(r errdefs.Remedy) string {
	var parts []string
	if r.Note != "" {
		parts = append(parts, r.Note)
	}
	if r.Action != "" {
		parts = append(parts, "`"+Command(r)+"`")
	}
	s := strings.Join(parts, ": ")
	if r.Where != "" {
		s += " (" + r.Where + ")"
	}
	return s
}

// Error is err's message followed by its remedies, one per line.
func Error(err error) string {
	var b strings.Builder
	b.WriteString(err.Error())
	rs := errdefs.Remedies(err)
	for _, r := range rs {
		fmt.Fprintf(&b, "\n  fix: %s", Remedy(r))
	}
	return b.String()
}
