package migrateapi

import (
	hostv1 "vtpm/api/vtpm/host/v1"
	"vtpm/internal/migrate"
	"vtpm/internal/qmp"
	"vtpm/internal/vm"
)

func specToProto(s *vm.IncomingSpec) *hostv1.IncomingSpec {
	p := &hostv1.IncomingSpec{Config: s.Config, Files: s.Files, Machine: s.Machine, Protector: s.Protector,
		Qemu: &hostv1.QEMUVersion{Major: int32(s.QEMU.Major), Minor: int32(s.QEMU.Minor), Micro: int32(s.QEMU.Micro)}}
	for _, d := range s.Disks {
		p.Disks = append(p.Disks, &hostv1.IncomingDisk{Size: d.Size, Shared: d.Shared, Marker: d.Marker})
	}
	return p
}

func specFromProto(p *hostv1.IncomingSpec) *vm.IncomingSpec {
	s := &vm.IncomingSpec{Config: p.GetConfig(), Files: p.GetFiles(), Machine: p.GetMachine(), Protector: p.GetProtector(),
		QEMU: qmp.Version{Major: int(p.GetQemu().GetMajor()), Minor: int(p.GetQemu().GetMinor()), Micro: int(p.GetQemu().GetMicro())}}
	for _, d := range p.GetDisks() {
		s.Disks = append(s.Disks, vm.IncomingDisk{Size: d.GetSize(), Shared: d.GetShared(), Marker: d.GetMarker()})
	}
	return s
}

// ProgressToProto and ProgressFromProto carry migrate.Progress.
func ProgressToProto(p migrate.Progress) *hostv1.MigrationProgress {
	return &hostv1.MigrationProgress{Vm: p.VM, Host: p.Host, Phase: p.Phase, Status: p.Status,
		DiskDone: p.DiskDone, DiskTotal: p.DiskTotal, RamTransferred: p.RAMTransferred, RamRemaining: p.RAMRemaining,
		RamTotal: p.RAMTotal, DirtyBytesPerSecond: p.DirtyRate, Mbps: p.MBps, TotalTimeMs: p.TotalTime,
		ExpectedDowntimeMs: p.ExpectedDowntime, DowntimeMs: p.Downtime}
}

func ProgressFromProto(p *hostv1.MigrationProgress) migrate.Progress {
	return migrate.Progress{VM: p.GetVm(), Host: p.GetHost(), Phase: p.GetPhase(), Status: p.GetStatus(),
		DiskDone: p.GetDiskDone(), DiskTotal: p.GetDiskTotal(), RAMTransferred: p.GetRamTransferred(),
		RAMRemaining: p.GetRamRemaining(), RAMTotal: p.GetRamTotal(), DirtyRate: p.GetDirtyBytesPerSecond(),
		MBps: p.GetMbps(), TotalTime: p.GetTotalTimeMs(), ExpectedDowntime: p.GetExpectedDowntimeMs(), Downtime: p.GetDowntimeMs()}
}

func resultToProto(r *migrate.Result) *hostv1.MigrationResult {
	return &hostv1.MigrationResult{Vm: r.VM, Host: r.Host, Granted: r.Granted, TotalTimeMs: r.TotalTime,
		DowntimeMs: r.Downtime, RamBytes: r.RAMBytes, DiskBytes: r.DiskBytes, TpmBackup: r.Backup}
}

// ResultFromProto is a migration's result as the local service sent it.
func ResultFromProto(p *hostv1.MigrationResult) *migrate.Result {
	return &migrate.Result{VM: p.GetVm(), Host: p.GetHost(), Granted: p.GetGranted(), TotalTime: p.GetTotalTimeMs(),
		Downtime: p.GetDowntimeMs(), RAMBytes: p.GetRamBytes(), DiskBytes: p.GetDiskBytes(), Backup: p.GetTpmBackup()}
}
