package hostd

import (
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/api/vtpm/host/v1/hostv1connect"
	"vtpm/internal/apierr"
	"vtpm/internal/hostcheck"
	"vtpm/internal/keybroker"
	"vtpm/internal/sandbox"
	"vtpm/internal/vm"
)

// hostService implements HostService.
type hostService struct {
	hostv1connect.UnimplementedHostServiceHandler
	s *Server
}

var _ hostv1connect.HostServiceHandler = (*hostService)(nil)

func (h *hostService) GetInfo(ctx context.Context, _ *connect.Request[hostv1.GetInfoRequest]) (*connect.Response[hostv1.GetInfoResponse], error) {
	s := h.s
	q := qemuInfo()
	info := &hostv1.GetInfoResponse{
		Name:                s.opts.Name,
		Version:             s.opts.Version,
		GuardianName:        s.local.Name(),
		GuardianFingerprint: s.local.Fingerprint(),
		QemuVersion:         q.version,
		MachineTypes:        q.machines,
	}
	for _, f := range hostcheck.FirmwareFiles() {
		if len(hostcheck.MissingFirmware(f)) == 0 {
			info.Firmware = append(info.Firmware, filepath.Base(f))
		}
	}
	if abi, err := sandbox.LandlockABI(); err == nil && abi > 0 {
		info.LandlockAbi = int32(abi)
		info.IsolationAvailable = true
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.opts.DataRoot, &st); err == nil {
		info.FreeBytes = st.Bavail * uint64(st.Bsize)
	}
	return connect.NewResponse(info), nil
}

func (h *hostService) ListVMs(ctx context.Context, _ *connect.Request[hostv1.ListVMsRequest]) (*connect.Response[hostv1.ListVMsResponse], error) {
	vms, err := VMList(h.s.vms)
	if err != nil {
		return nil, apierr.ToConnect(err, h.s.opts.Name)
	}
	return connect.NewResponse(&hostv1.ListVMsResponse{Vms: vms}), nil
}

// VMList is reg's VMs as HostService.ListVMs gives them.
func VMList(reg *vm.Registry) ([]*hostv1.VM, error) {
	list, err := reg.List(true)
	if err != nil {
		return nil, err
	}
	var out []*hostv1.VM
	for _, v := range list {
		m := &hostv1.VM{Name: v.Name, Uuid: v.UUID, Running: v.State == "running", TpmEnabled: v.TPM == "enabled"}
		// The protector names the TPM and its owner; reading it opens no key.
		if v.Path != "" {
			if p, err := keybroker.ReadProtector(filepath.Join(v.Path, vm.TPMDir)); err == nil {
				m.TpmUuid = p.TPM().String()
				m.TpmOwnerFingerprint = p.Owner().Fingerprint()
			}
		}
		out = append(out, m)
	}
	return out, nil
}

type qemu struct {
	version  string
	machines []string
}

var (
	qemuOnce  sync.Once
	qemuFound qemu
)

// qemuInfo asks QEMU its version and machine types, once per process.
func qemuInfo() qemu {
	qemuOnce.Do(func() {
		exe, err := hostcheck.FindQEMU()
		if err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		out, _ := exec.CommandContext(ctx, exe, "--version").Output()
		if m := regexp.MustCompile(`version (\d+\.\d+(?:\.\d+)?)`).FindSubmatch(out); m != nil {
			qemuFound.version = string(m[1])
		}
		// "Supported machines are:" then "name  description" lines.
		out, _ = exec.CommandContext(ctx, exe, "-machine", "help").Output()
		for _, line := range strings.Split(string(out), "\n")[1:] {
			if f := strings.Fields(line); len(f) > 0 {
				qemuFound.machines = append(qemuFound.machines, f[0])
			}
		}
	})
	return qemuFound
}
