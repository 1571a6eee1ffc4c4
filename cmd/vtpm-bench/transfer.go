package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"vtpm/internal/hostcheck"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/transfer"
	"vtpm/internal/vm"
)

const moveSection = "11. Offline move of a stopped VM between two data roots, against cp of its bundle"

// offlineMove moves a stopped VM (a manufactured TPM and a disk of
// -move-mib MiB of random data, so nothing is sparse) back and forth
// between two data roots of this machine through the transfer stream
// (manifest, extents, SHA-256 of every file, fsync, vm.json validated,
// registered), and copies the same bundle with `cp -r` followed by `sync`
// of the copied files, interleaved. The rows are throughputs in MiB/s of
// the bundle's bytes. The stream runs in process, without the TLS channel
// between two host services.
func (b *bench) offlineMove() ([]row, error) {
	if b.cfg.moves <= 0 {
		return []row{{section: moveSection, skip: "-moves 0"}}, nil
	}
	code, vars := hostcheck.Firmware(true)
	if missing := hostcheck.MissingFirmware(code, vars); len(missing) > 0 {
		return []row{{section: moveSection, skip: fmt.Sprintf("OVMF firmware %v is not installed", missing)}}, nil
	}
	b.progress("offline move: %d × (vm move, cp -r) of a bundle with a %d MiB disk", b.cfg.moves, b.cfg.moveMiB)
	hosts := [2]*vm.Registry{}
	for i := range hosts {
		root := filepath.Join(b.base, fmt.Sprintf("move-host-%d", i))
		hosts[i] = vm.NewRegistry(root, func() (*keybroker.Broker, error) {
			return keybroker.Open(root, keystore.Options{HostTPM: "none", Logger: quiet()})
		})
		hosts[i].Log = quiet()
	}
	disk := filepath.Join(b.base, "move-disk.raw")
	if err := randomFile(disk, int64(b.cfg.moveMiB)<<20); err != nil {
		return nil, err
	}
	on := true
	res, err := hosts[0].Create(vm.CreateOptions{Name: "mover", OS: vm.Linux, TPM: &on, Disk: disk})
	if err != nil {
		return nil, err
	}
	if err := admitEachOther(hosts[0], hosts[1], res.VM.TPMDir()); err != nil {
		return nil, err
	}
	// The first move carries the disk into the bundle.
	if _, err := transfer.Send(context.Background(), hosts[0], res.VM, transfer.Local{Registry: hosts[1]}, transfer.Options{Op: vm.OpMove, To: "b"}); err != nil {
		return nil, err
	}
	os.Remove(disk)
	at := 1
	var moveS, cpS []float64
	for i := range b.cfg.moves {
		v, err := hosts[at].Open("mover")
		if err != nil {
			return nil, err
		}
		size, err := dirSize(v.Dir)
		if err != nil {
			return nil, err
		}
		mib := float64(size) / (1 << 20)
		cp := func() error {
			dst := filepath.Join(b.base, fmt.Sprintf("cp-%d", i))
			defer os.RemoveAll(dst)
			cur, err := hosts[at].Open("mover")
			if err != nil {
				return err
			}
			t0 := time.Now()
			if out, err := exec.Command("cp", "-r", cur.Dir, dst).CombinedOutput(); err != nil {
				return fmt.Errorf("cp: %v: %s", err, out)
			}
			if out, err := exec.Command("sh", "-c", `find "$1" -type f -exec sync {} +`, "sh", dst).CombinedOutput(); err != nil {
				return fmt.Errorf("sync: %v: %s", err, out)
			}
			cpS = append(cpS, mib/time.Since(t0).Seconds())
			return nil
		}
		move := func() error {
			v, err := hosts[at].Open("mover")
			if err != nil {
				return err
			}
			t0 := time.Now()
			if _, err := transfer.Send(context.Background(), hosts[at], v, transfer.Local{Registry: hosts[1-at]}, transfer.Options{Op: vm.OpMove, To: "other"}); err != nil {
				return err
			}
			moveS = append(moveS, mib/time.Since(t0).Seconds())
			at = 1 - at
			// The backup of the TPM state the move kept on the source.
			return os.RemoveAll(hosts[1-at].BackupsDir())
		}
		steps := []func() error{move, cp}
		if i%2 == 1 {
			steps = []func() error{cp, move}
		}
		for _, f := range steps {
			if err := f(); err != nil {
				return nil, err
			}
		}
	}
	note := fmt.Sprintf("bundle of %d MiB (disk, UEFI variables, sealed TPM); move includes pre-flight (protector opened on the destination), SHA-256, fsync, registering, and removing the source", b.cfg.moveMiB)
	return []row{
		{section: moveSection, name: "vm move (in process, no TLS)", unit: "MiB/s", s: [2][]float64{nil, moveS}, vtpmOnly: true, note: note},
		{section: moveSection, name: "cp -r of the bundle, then sync of its files", unit: "MiB/s", s: [2][]float64{nil, cpS}, vtpmOnly: true},
	}, nil
}

// admitEachOther grants each host's guardian on the TPM in dir (owned by
// a) and makes each trust the other as an owner.
func admitEachOther(a, b *vm.Registry, dir string) error {
	ka, err := a.Keys()
	if err != nil {
		return err
	}
	defer ka.Close()
	kb, err := b.Keys()
	if err != nil {
		return err
	}
	defer kb.Close()
	ga, err := ka.Local()
	if err != nil {
		return err
	}
	gb, err := kb.Local()
	if err != nil {
		return err
	}
	if _, err := ka.Grant(dir, gb.Public()); err != nil {
		return err
	}
	if _, err := kb.Trust(ga.Public()); err != nil {
		return err
	}
	_, err = ka.Trust(gb.Public())
	return err
}

func randomFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func dirSize(dir string) (int64, error) {
	var n int64
	err := filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() {
			n += info.Size()
		}
		return err
	})
	return n, err
}
