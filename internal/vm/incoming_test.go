package vm

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/qmp"
	"vtpm/internal/testutil"
)

// TestPreflightIncoming: what a destination refuses before making
// anything, each problem with its kind, and nothing made either way.
func TestPreflightIncoming(t *testing.T) {
	src, dst := testHost(t), testHost(t)
	if _, err := src.Create(CreateOptions{Name: "web", OS: Linux, TPM: yes(), DiskSize: "1M"}); err != nil {
		t.Fatal(err)
	}
	v, err := src.Open("web")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := json.Marshal(v.Config)
	if err != nil {
		t.Fatal(err)
	}
	vars, err := os.ReadFile(filepath.Join(v.Dir, VarsFile))
	if err != nil {
		t.Fatal(err)
	}
	prot, err := os.ReadFile(filepath.Join(v.TPMDir(), keybroker.ProtectorFile))
	if err != nil {
		t.Fatal(err)
	}
	ms, ver, err := qemuMachines(context.Background())
	if err != nil {
		testutil.Missing(t, "no QEMU here: %v", err)
	}
	machine := ""
	for m := range ms {
		if strings.HasPrefix(m, "pc-q35-") {
			machine = m
			break
		}
	}
	good := func() *IncomingSpec {
		return &IncomingSpec{Config: cfg, Files: map[string][]byte{VarsFile: vars}, Disks: []IncomingDisk{{Size: 1 << 20}},
			Machine: machine, QEMU: ver, Protector: prot}
	}
	for _, tc := range []struct {
		name string
		edit func(s *IncomingSpec)
		want []string // in the refusal; nil: accepted but for the key
		kind error
	}{
		{"protector does not admit this host", func(*IncomingSpec) {}, []string{"cannot be opened on this host"}, errdefs.ErrPermissionDenied},
		{"unknown machine", func(s *IncomingSpec) { s.Machine = "pc-q35-99.0" }, []string{"no machine type pc-q35-99.0"}, errdefs.ErrFailedPrecondition},
		{"newer QEMU there", func(s *IncomingSpec) { s.QEMU = qmp.Version{Major: 99} }, []string{"older than the VM's QEMU 99.0.0"}, errdefs.ErrFailedPrecondition},
		{"no variable store", func(s *IncomingSpec) { delete(s.Files, VarsFile) }, []string{"variable store did not come"}, errdefs.ErrInvalidArgument},
		{"a file vm.json does not name", func(s *IncomingSpec) { s.Files["../../etc/x"] = []byte("x") }, []string{`file "../../etc/x"`}, errdefs.ErrInvalidArgument},
		{"disk count", func(s *IncomingSpec) { s.Disks = nil }, []string{"0 disk sizes for 1 disks"}, errdefs.ErrInvalidArgument},
		{"disk size", func(s *IncomingSpec) { s.Disks[0].Size = -1 }, []string{"size -1 out of range"}, errdefs.ErrInvalidArgument},
		{"no protector", func(s *IncomingSpec) { s.Protector = nil }, []string{"key protector did not come"}, errdefs.ErrInvalidArgument},
		{"bad vm.json", func(s *IncomingSpec) { s.Config = []byte("{") }, []string{"does not parse"}, errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := good()
			tc.edit(s)
			_, err := dst.PreflightIncoming(context.Background(), s)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("refusal lacks %q:\n%v", w, err)
				}
			}
			found := false
			var ie *IncomingError
			if errors.As(err, &ie) {
				for _, p := range ie.Problems {
					found = found || errors.Is(p, tc.kind)
				}
			} else {
				found = errors.Is(err, tc.kind)
			}
			if !found {
				t.Errorf("no problem of kind %v in %v", tc.kind, err)
			}
			if _, err := os.Stat(filepath.Join(dst.VMsDir(), "web")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the pre-flight made the bundle: %v", err)
			}
		})
	}

	// Admitted and trusting the owner: only a name already taken stands in the way.
	ks, kd := mustKeys(t, src), mustKeys(t, dst)
	gs, _ := ks.Local()
	gd, _ := kd.Local()
	if _, err := kd.Trust(gs.Public()); err != nil {
		t.Fatal(err)
	}
	// A fleet host: no guardian here is admitted, but the protector has
	// the row of the fleet guardian this host's service asks the key
	// service for, so the TPM can be adopted with the key it releases.
	fleet, err := guardian.New("fleet", guardian.MLKEM768X25519)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ks.Grant(v.TPMDir(), fleet.Public()); err != nil {
		t.Fatal(err)
	}
	fs := good()
	if fs.Protector, err = os.ReadFile(filepath.Join(v.TPMDir(), keybroker.ProtectorFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.PreflightIncoming(context.Background(), fs); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("a protector with a fleet row, on a host that knows no fleet guardian: %v, want permission denied", err)
	}
	certs, err := fleet.ExportCertificates()
	if err != nil {
		t.Fatal(err)
	}
	if err := hostsvc.WriteFleet(dst.Root, certs); err != nil {
		t.Fatal(err)
	}
	dst.HostSocket = filepath.Join(dst.Root, "host.sock")
	if _, err := dst.PreflightIncoming(context.Background(), fs); err != nil {
		t.Errorf("a fleet host refuses a TPM with the fleet guardian's row: %v", err)
	}
	dst.HostSocket = ""
	if _, err := ks.Grant(v.TPMDir(), gd.Public()); err != nil {
		t.Fatal(err)
	}
	ks.Close()
	kd.Close()
	s := good()
	if s.Protector, err = os.ReadFile(filepath.Join(v.TPMDir(), keybroker.ProtectorFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.PreflightIncoming(context.Background(), s); err != nil {
		t.Fatalf("an admitted host refuses: %v", err)
	}
	sharedDisk(t, src, dst, v, s)
	if _, err := dst.Create(CreateOptions{Name: "web", OS: Linux, NoDisk: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.PreflightIncoming(context.Background(), s); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("a name taken here: %v", err)
	}
}

// sharedDisk: a disk outside the bundle, at a path both hosts allow, is
// shared storage when the destination finds beside it the marker the
// source made; a marker it does not see, or none, is refused as not the
// same storage.
func sharedDisk(t *testing.T, src, dst *Registry, v *VM, good *IncomingSpec) {
	t.Helper()
	dir := t.TempDir()
	disk := filepath.Join(dir, "shared.raw")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.AllowPaths(dir); err != nil {
		t.Fatal(err)
	}
	c := *v.Config
	c.Disks = append(append([]Disk{}, c.Disks...), Disk{Path: disk, Format: "raw"})
	cfg, err := json.Marshal(&c)
	if err != nil {
		t.Fatal(err)
	}
	name, file, err := markShared(disk, &c)
	if err != nil {
		t.Fatal(err)
	}
	out := &IncomingSpec{markers: []string{file}}
	for _, tc := range []struct {
		name   string
		marker string
		want   string // "" accepted
	}{
		{"marked", name, ""},
		{"no marker", "", "no valid shared-storage marker"},
		{"a marker not here", markerPrefix + strings.Repeat("0", 32), "is not the source's"},
		{"a marker that is a path", "../" + name, "no valid shared-storage marker"},
	} {
		t.Run("shared disk/"+tc.name, func(t *testing.T) {
			s := *good
			s.Config = cfg
			s.Disks = append(append([]IncomingDisk{}, good.Disks...), IncomingDisk{Size: 1 << 20, Shared: true, Marker: tc.marker})
			_, err := dst.PreflightIncoming(context.Background(), &s)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want a refusal saying %q", err, tc.want)
			}
		})
	}
	out.RemoveMarkers()
	if _, err := os.Lstat(file); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the marker is left after RemoveMarkers: %v", err)
	}
}

func mustKeys(t *testing.T, h *Registry) *keybroker.Broker {
	t.Helper()
	k, err := h.Keys()
	if err != nil {
		t.Fatal(err)
	}
	return k
}
