package libvirttest

import (
	"encoding/xml"
	"testing"
)

func TestDomainXML(t *testing.T) {
	type parsed struct {
		Name   string `xml:"name"`
		Memory int    `xml:"memory"`
		OS     struct {
			Kernel  string `xml:"kernel"`
			Cmdline string `xml:"cmdline"`
			NVRAM   struct {
				Template string `xml:"template,attr"`
			} `xml:"nvram"`
		} `xml:"os"`
		Serial struct {
			Source struct {
				Path string `xml:"path,attr"`
			} `xml:"source"`
		} `xml:"devices>serial"`
		TPM struct {
			Model   string `xml:"model,attr"`
			Backend struct {
				Type    string `xml:"type,attr"`
				Version string `xml:"version,attr"`
			} `xml:"backend"`
		} `xml:"devices>tpm"`
	}
	for _, tc := range []struct {
		name    string
		dom     Domain
		memory  int
		model   string
		kernel  string
		vars    string
		cmdline string
		serial  string
	}{
		{
			name:   "defaults",
			dom:    Domain{Name: "a", Kernel: "/k", VarsTemplate: "/v", SerialSocket: "/s"},
			memory: 512, model: "tpm-crb", kernel: "/k", vars: "/v", serial: "/s",
		},
		{
			name: "markup in values stays text",
			dom: Domain{Name: "a", MemoryMiB: 256, TPMModel: "tpm-tis", Kernel: "/k<&>", VarsTemplate: "/v'\"",
				Cmdline: "a='b' <c>", SerialSocket: "/s&"},
			memory: 256, model: "tpm-tis", kernel: "/k<&>", vars: "/v'\"", cmdline: "a='b' <c>", serial: "/s&",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x, err := tc.dom.XML()
			if err != nil {
				t.Fatal(err)
			}
			var p parsed
			if err := xml.Unmarshal([]byte(x), &p); err != nil {
				t.Fatalf("%v\n%s", err, x)
			}
			if p.Memory != tc.memory || p.TPM.Model != tc.model || p.OS.Kernel != tc.kernel ||
				p.OS.NVRAM.Template != tc.vars || p.OS.Cmdline != tc.cmdline || p.Serial.Source.Path != tc.serial {
				t.Errorf("parsed %+v from\n%s", p, x)
			}
			if p.TPM.Backend.Type != "emulator" || p.TPM.Backend.Version != "2.0" {
				t.Errorf("TPM backend %+v, want an emulator TPM 2.0", p.TPM.Backend)
			}
		})
	}
}
