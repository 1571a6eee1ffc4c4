package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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
// between two host services, and through two host services (vtpm-hostd
// beside vtpm) on loopback ports, as `vtpm vm move` runs it.
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
	svc, err := b.startServiceHosts(disk)
	if err != nil {
		return nil, fmt.Errorf("hosts with services: %w", err)
	}
	defer svc.stop()
	os.Remove(disk)
	at := 1
	var moveS, svcS, cpS []float64
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
		overAPI := func() error {
			t0 := time.Now()
			if err := svc.move(); err != nil {
				return err
			}
			svcS = append(svcS, mib/time.Since(t0).Seconds())
			return nil
		}
		steps := []func() error{move, overAPI, cp}
		if i%2 == 1 {
			steps = []func() error{cp, overAPI, move}
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
		{section: moveSection, name: "vtpm vm move through two host services (mutual TLS, HTTP/2, loopback)", unit: "MiB/s", s: [2][]float64{nil, svcS}, vtpmOnly: true,
			note: "the CLI asks its host service, which streams the bundle to the other's TransferService; timed from the command's start to its exit"},
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

// serviceHosts are two data roots, each with its host service (vtpm-hostd
// beside vtpm) on a loopback port, trusting each other; a VM moves back
// and forth between them through `vtpm vm move`.
type serviceHosts struct {
	vtpm  string
	hosts [2]*serviceHost
	at    int // where the VM is
}

type serviceHost struct {
	name, root, addr string
	env              []string
	cmd              *exec.Cmd
	log              *bytes.Buffer
}

func (b *bench) startServiceHosts(disk string) (*serviceHosts, error) {
	vt := b.impls[1].argv[0]
	hostd := filepath.Join(filepath.Dir(vt), "vtpm-hostd")
	if _, err := os.Stat(hostd); err != nil {
		return nil, fmt.Errorf("%w (build it with `make build`)", err)
	}
	sh := &serviceHosts{vtpm: vt}
	for i, name := range []string{"a", "b"} {
		dir := filepath.Join(b.base, "svc-"+name)
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		h := &serviceHost{name: name, root: filepath.Join(dir, "root"), addr: addr, log: &bytes.Buffer{}}
		keySock, apiSock := filepath.Join(dir, "host.sock"), filepath.Join(dir, "api.sock")
		h.env = []string{"VTPM_HOME=" + h.root, "VTPM_HOST_TPM=none", "VTPM_HOST_SOCKET=" + keySock, "VTPM_API_SOCKET=" + apiSock}
		if err := os.MkdirAll(h.root, 0o700); err != nil {
			return nil, err
		}
		h.cmd = exec.Command(hostd, "serve", "--socket", keySock, "--data-root", h.root, "--listen", addr, "--name", name)
		h.cmd.Env = append(os.Environ(), h.env...)
		h.cmd.Stderr = h.log
		h.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := h.cmd.Start(); err != nil {
			return nil, err
		}
		sh.hosts[i] = h
		if err := waitSocket(apiSock, 10*time.Second); err != nil {
			sh.stop()
			return nil, fmt.Errorf("host service %s: %w\n%s", name, err, h.log)
		}
	}
	fail := func(err error) (*serviceHosts, error) {
		sh.stop()
		return nil, err
	}
	var pems [2]string
	for i, h := range sh.hosts {
		pems[i] = filepath.Join(b.base, "svc-"+h.name+".pem")
		if _, err := sh.run(h, "guardian", "export", "--certs-only", "-o", pems[i]); err != nil {
			return fail(err)
		}
	}
	for i, h := range sh.hosts {
		o := sh.hosts[1-i]
		if _, err := sh.run(h, "host", "trust", o.name, o.addr, pems[1-i]); err != nil {
			return fail(err)
		}
	}
	if _, err := sh.run(sh.hosts[0], "vm", "create", "mover", "--os", "linux", "--tpm", "--disk", disk); err != nil {
		return fail(err)
	}
	// The first move grants b and carries the disk into the bundle.
	if _, err := sh.run(sh.hosts[0], "vm", "move", "mover", "--to", "b", "--grant"); err != nil {
		return fail(err)
	}
	sh.at = 1
	return sh, nil
}

// move moves the VM to the other host, and removes the backup of its TPM
// state that the move kept.
func (sh *serviceHosts) move() error {
	from, to := sh.hosts[sh.at], sh.hosts[1-sh.at]
	if _, err := sh.run(from, "vm", "move", "mover", "--to", to.name); err != nil {
		return err
	}
	sh.at = 1 - sh.at
	return os.RemoveAll(filepath.Join(from.root, "backups"))
}

func (sh *serviceHosts) run(h *serviceHost, args ...string) (string, error) {
	cmd := exec.Command(sh.vtpm, args...)
	cmd.Env = append(os.Environ(), h.env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("on %s: vtpm %s: %v\n%s", h.name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (sh *serviceHosts) stop() {
	for _, h := range sh.hosts {
		if h != nil && h.cmd.Process != nil {
			h.cmd.Process.Signal(syscall.SIGTERM)
			h.cmd.Wait()
		}
	}
}

func waitSocket(path string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
