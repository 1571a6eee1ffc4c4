package libvirttest

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"strings"
	"text/template"
)

// Domain is a UEFI guest with an emulator TPM 2.0, the way a user declares
// one: libvirt chooses the TPM's paths, user and command lines.
type Domain struct {
	Name string
	UUID string
	// MemoryMiB is the guest's RAM; default 512.
	MemoryMiB int
	// Loader and VarsTemplate are the OVMF code (Secure Boot, SMM) and the
	// variable store libvirt copies for the domain's nvram.
	Loader, VarsTemplate string
	// Kernel, Initrd and Cmdline boot the guest directly; libvirt's DAC
	// driver hands them to its QEMU user while the domain runs.
	Kernel, Initrd, Cmdline string
	// SerialSocket is where QEMU serves the guest's ttyS0.
	SerialSocket string
	// TPMModel is "tpm-crb" (default) or "tpm-tis".
	TPMModel string
}

// domainXML uses only what every libvirt 9 accepts; TCG, since the tests
// also run where there is no KVM.
var domainXML = template.Must(template.New("domain").Funcs(template.FuncMap{"x": escape}).Parse(`<domain type='qemu'>
  <name>{{x .Name}}</name>
  <uuid>{{x .UUID}}</uuid>
  <memory unit='MiB'>{{.MemoryMiB}}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>{{x .Loader}}</loader>
    <nvram template='{{x .VarsTemplate}}'/>
    <kernel>{{x .Kernel}}</kernel>
    <initrd>{{x .Initrd}}</initrd>
    <cmdline>{{x .Cmdline}}</cmdline>
  </os>
  <features>
    <acpi/>
    <smm state='on'/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='unix'>
      <source mode='bind' path='{{x .SerialSocket}}'/>
      <target port='0'/>
    </serial>
    <tpm model='{{x .TPMModel}}'>
      <backend type='emulator' version='2.0'/>
    </tpm>
    <memballoon model='none'/>
  </devices>
</domain>
`))

// XML is the domain's definition for virsh define.
func (d Domain) XML() (string, error) {
	if d.MemoryMiB == 0 {
		d.MemoryMiB = 512
	}
	if d.TPMModel == "" {
		d.TPMModel = "tpm-crb"
	}
	var b bytes.Buffer
	if err := domainXML.Execute(&b, d); err != nil {
		return "", fmt.Errorf("domain %s: %w", d.Name, err)
	}
	return b.String(), nil
}

// escape makes s safe inside an XML element or a quoted attribute.
func escape(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}
