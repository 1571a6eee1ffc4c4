package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"vtpm/internal/hostcheck"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/migrate"
	"vtpm/internal/qemutest"
	"vtpm/internal/vm"
)

const hostMigrateSection = "12. Live migration between hosts: vm migrate (TLS stream, disk mirrored over NBD+TLS)"

// hostMigrations migrates the same small VM (256 MiB, a 64 MiB qcow2 disk
// in its bundle) from one data root to another on this machine, as `vm
// migrate` does between hosts (in process: migrate.Source to a
// migrate.Local on 127.0.0.2), with a vTPM and without a TPM, interleaved.
// QEMU's total time and downtime and the bytes sent are its own
// (query-migrate, block jobs). Section 9 has the same guest between two
// plain QEMUs over a unix socket, with swtpm and without a TPM.
func (b *bench) hostMigrations() ([]row, error) {
	if b.cfg.hostMigrations <= 0 {
		return []row{{section: hostMigrateSection, skip: "-host-migrations 0"}}, nil
	}
	if err := hostcheck.QEMUUsable(); err != nil {
		return []row{{section: hostMigrateSection, skip: fmt.Sprintf("QEMU cannot run guests here: %v", err)}}, nil
	}
	b.progress("live migration between hosts: %d × (vTPM, no TPM), each a guest boot and a migration", b.cfg.hostMigrations)
	var total, down, ram, disk [2][]float64 // [0]: no TPM, [1]: vTPM
	for i := range b.cfg.hostMigrations {
		for _, tpm := range []bool{i%2 == 0, i%2 != 0} {
			res, err := b.hostMigrateOnce(tpm, i)
			if err != nil {
				return nil, fmt.Errorf("with TPM %v: %w", tpm, err)
			}
			k := 0
			if tpm {
				k = 1
			}
			total[k] = append(total[k], float64(res.TotalTime))
			down[k] = append(down[k], float64(res.Downtime))
			ram[k] = append(ram[k], float64(res.RAMBytes)/(1<<20))
			disk[k] = append(disk[k], float64(res.DiskBytes)/(1<<20))
		}
	}
	r := func(name, unit string, s [2][]float64) []row {
		return []row{
			{section: hostMigrateSection, name: name + ", VM with a vTPM", unit: unit, s: [2][]float64{nil, s[1]}, vtpmOnly: true},
			{section: hostMigrateSection, name: name + ", same VM without a TPM", unit: unit, s: [2][]float64{nil, s[0]}, vtpmOnly: true},
		}
	}
	var rows []row
	rows = append(rows, r("QEMU total time", "ms", total)...)
	rows = append(rows, r("QEMU downtime", "ms", down)...)
	rows = append(rows, r("memory sent", "MiB", ram)...)
	rows = append(rows, r("disk mirrored (offset reached)", "MiB", disk)...)
	return rows, nil
}

// hostMigrateOnce creates a VM on data root a, boots it and migrates it to
// data root b.
func (b *bench) hostMigrateOnce(tpm bool, i int) (*migrate.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	img, err := qemutest.BuildImage(ctx)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "vbm")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	run := filepath.Join(dir, "run")
	if err := os.Mkdir(run, 0o700); err != nil {
		return nil, err
	}
	os.Setenv("XDG_RUNTIME_DIR", run)
	os.Setenv("VTPM_HOST_TPM", "none")
	accel := "tcg"
	if qemutest.KVMAvailable() {
		accel = "kvm"
	}
	reg := func(name string) *vm.Registry {
		root := filepath.Join(dir, name)
		r := vm.NewRegistry(root, func() (*keybroker.Broker, error) {
			return keybroker.Open(root, keystore.Options{HostTPM: "none"})
		})
		r.Exe = b.impls[1].argv[0]
		return r
	}
	a, bb := reg("a"), reg("b")
	name := fmt.Sprintf("m%d", i)
	if _, err := bb.AllowPaths(img.Kernel, img.Initrd); err != nil {
		return nil, err
	}
	if _, err := a.Create(vm.CreateOptions{Name: name, OS: vm.Linux, TPM: &tpm, DiskSize: "64M", Memory: "256M", CPUs: 1,
		Kernel: img.Kernel, Initrd: img.Initrd, Append: "quiet rdinit=/init no_timer_check"}); err != nil {
		return nil, err
	}
	v, err := a.Open(name)
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "ser.sock")
	if _, err := a.Start(ctx, v, vm.StartOptions{SerialSocket: sock, Accel: accel}); err != nil {
		return nil, err
	}
	defer func() {
		for _, r := range []*vm.Registry{a, bb} {
			if v, err := r.Open(name); err == nil {
				r.Stop(context.Background(), v, 0)
			}
		}
	}()
	s, err := qemutest.DialSerial(ctx, sock)
	if err != nil {
		return nil, err
	}
	s.Close()
	dst := &migrate.Local{Registry: bb, Host: "b", IP: "127.0.0.2", Accel: accel}
	if tpm {
		// b may open the TPM: a's protector admits it and b trusts a.
		if err := admitEachOther(a, bb, v.TPMDir()); err != nil {
			return nil, err
		}
	}
	src := &migrate.Source{Registry: a, Host: "a"}
	return src.Migrate(ctx, name, dst, migrate.Options{})
}
