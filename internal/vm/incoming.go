package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/hostcheck"
	"vtpm/internal/hostsvc"
	"vtpm/internal/keybroker"
	"vtpm/internal/qmp"
	"vtpm/internal/sandbox"
)

// IncomingSpec is what a destination host needs to receive a running VM
// by live migration. Everything in it comes from another host and is
// checked as untrusted input.
type IncomingSpec struct {
	// Config is the source's vm.json.
	Config []byte `json:"config"`
	// Files are the bundle's small files by their path in the bundle: the
	// UEFI variable store, a direct-boot kernel and initrd kept in it.
	Files map[string][]byte `json:"files,omitempty"`
	// Disks are the virtual sizes of vm.json's disks, in its order.
	Disks []IncomingDisk `json:"disks"`
	// Machine is the source QEMU's resolved machine type (pc-q35-7.2),
	// QEMU its version: the destination must run the same machine.
	Machine string      `json:"machine"`
	QEMU    qmp.Version `json:"qemu"`
	// Protector is the TPM's protector.json (nil without a TPM): the
	// destination must be able to open it to adopt the TPM.
	Protector []byte `json:"protector,omitempty"`

	// markers are the files the source made beside its shared disks.
	markers []string
}

// RemoveMarkers removes the files OutgoingSpec made beside the shared
// disks; the source calls it once the migration has ended, either way.
func (s *IncomingSpec) RemoveMarkers() {
	for _, m := range s.markers {
		os.Remove(m)
	}
	s.markers = nil
}

// IncomingDisk is one disk of an IncomingSpec.
type IncomingDisk struct {
	Size int64 `json:"size"`
	// Shared: the destination sees the disk at the same path (shared
	// storage), so it is not copied; it opens the file in place.
	Shared bool `json:"shared,omitempty"`
	// Marker is the name of a file the source made beside a shared disk
	// image for this migration: a destination that sees it beside the
	// same path sees the same storage, not a file of its own that happens
	// to have the disk's name. Passthrough devices have none.
	Marker string `json:"marker,omitempty"`
}

// markerPrefix starts the name of a shared disk's marker; random hex
// follows (isMarker).
const markerPrefix = ".vtpm-shared-"

// isMarker reports whether name is a marker's name: the prefix and 32
// lower-case hex digits. (Not a package-level regexp: every vTPM start
// would compile it.)
func isMarker(name string) bool {
	hex, ok := strings.CutPrefix(name, markerPrefix)
	if !ok || len(hex) != 32 {
		return false
	}
	for _, c := range hex {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// markShared makes a marker file beside disk image path, for a
// destination to find (IncomingDisk.Marker): a name no one else has, made
// with O_EXCL, holding the VM's name and UUID for whoever finds one left.
func markShared(path string, c *Config) (name, file string, err error) {
	var r [16]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", "", err
	}
	name = markerPrefix + hex.EncodeToString(r[:])
	file = filepath.Join(filepath.Dir(path), name)
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return "", "", fmt.Errorf("mark disk %s as shared storage for the destination to find: %w", path, err)
	}
	_, err = fmt.Fprintf(f, "VM %s (%s) migrating: the destination checks it sees this storage\n", c.Name, c.UUID)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(file)
		return "", "", err
	}
	return name, file, nil
}

// sharedHere checks that this host sees shared disk d as the source does:
// the marker the source made beside it is beside it here too.
func sharedHere(d Disk, in IncomingDisk) error {
	if d.Passthrough {
		return nil // a device node: there is nothing to mark beside it
	}
	if !isMarker(in.Marker) {
		return errdefs.New(errdefs.ErrInvalidArgument, "disk %s: the source sent no valid shared-storage marker (%q)", d.Path, in.Marker)
	}
	m := filepath.Join(filepath.Dir(d.Path), in.Marker)
	st, err := os.Lstat(m)
	if err != nil || !st.Mode().IsRegular() {
		return errdefs.New(errdefs.ErrFailedPrecondition,
			"disk %s is outside the VM's bundle, so it must be shared storage, and %s here is not the source's: the marker the source made beside it, %s, is not here",
			d.Path, d.Path, in.Marker)
	}
	return nil
}

// incomingMark marks a bundle a live migration is filling: not registered,
// removed when the migration fails.
const incomingMark = ".incoming"

// OutgoingSpec describes running VM v, whose monitor is q, for a
// destination host: disks inside the bundle are copied, disks outside it
// (allowed host paths) are taken as shared storage.
func (h *Registry) OutgoingSpec(ctx context.Context, v *VM, q *qmp.Conn) (*IncomingSpec, error) {
	c := v.Config
	cfg, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	spec := &IncomingSpec{Config: cfg, Files: map[string][]byte{}}
	for _, rel := range []string{VarsFile, c.Kernel, c.Initrd} {
		if rel == "" || filepath.IsAbs(rel) {
			continue
		}
		if rel == VarsFile && c.Firmware != UEFI {
			continue
		}
		b, err := os.ReadFile(filepath.Join(v.Dir, rel))
		if err != nil {
			return nil, fmt.Errorf("read %s of VM %s: %w", rel, c.Name, err)
		}
		spec.Files[rel] = b
	}
	if spec.QEMU, err = q.QueryVersion(ctx); err != nil {
		return nil, err
	}
	if spec.Machine, err = resolvedMachine(ctx, q, c); err != nil {
		return nil, err
	}
	devs, err := q.QueryBlock(ctx)
	if err != nil {
		return nil, err
	}
	for i, d := range c.Disks {
		size := int64(-1)
		for _, dev := range devs {
			if dev.Device == DiskDevice(i) && dev.Inserted != nil {
				size = dev.Inserted.Image.VirtualSize
			}
		}
		if size < 0 {
			return nil, fmt.Errorf("VM %s: QEMU has no drive %s for disk %s", c.Name, DiskDevice(i), d.Path)
		}
		in := IncomingDisk{Size: size, Shared: d.Passthrough || filepath.IsAbs(d.Path)}
		if in.Shared && !d.Passthrough {
			name, file, err := markShared(d.Path, c)
			if err != nil {
				spec.RemoveMarkers()
				return nil, err
			}
			in.Marker = name
			spec.markers = append(spec.markers, file)
		}
		spec.Disks = append(spec.Disks, in)
	}
	if c.TPMEnabled() {
		p, err := os.ReadFile(filepath.Join(v.TPMDir(), keybroker.ProtectorFile))
		if err != nil {
			spec.RemoveMarkers()
			return nil, fmt.Errorf("VM %s: the TPM's key protector: %w", c.Name, err)
		}
		spec.Protector = p
	}
	return spec, nil
}

// DiskDevice is QEMU's name for disk i of a VM (-drive if=virtio,index=i).
func DiskDevice(i int) string { return "virtio" + strconv.Itoa(i) }

// resolvedMachine is the versioned machine type the alias vm start gave
// QEMU stands for.
func resolvedMachine(ctx context.Context, q *qmp.Conn, c *Config) (string, error) {
	raw, err := q.Execute(ctx, "query-machines", nil)
	if err != nil {
		return "", err
	}
	var ms []struct {
		Name  string `json:"name"`
		Alias string `json:"alias"`
	}
	if err := json.Unmarshal(raw, &ms); err != nil {
		return "", fmt.Errorf("decode query-machines: %w", err)
	}
	for _, m := range ms {
		if m.Alias == "q35" {
			return m.Name, nil
		}
	}
	return "", fmt.Errorf("VM %s: QEMU does not say what machine q35 is", c.Name)
}

// qemuMachines lists the machine types this host's QEMU provides.
func qemuMachines(ctx context.Context) (map[string]bool, qmp.Version, error) {
	out, err := exec.CommandContext(ctx, hostcheck.QEMU, "-machine", "help").Output()
	if err != nil {
		return nil, qmp.Version{}, fmt.Errorf("%s -machine help: %w", hostcheck.QEMU, err)
	}
	ms := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		if name, _, ok := strings.Cut(line, " "); ok && name != "" {
			ms[name] = true
		}
	}
	vout, err := exec.CommandContext(ctx, hostcheck.QEMU, "--version").Output()
	if err != nil {
		return nil, qmp.Version{}, fmt.Errorf("%s --version: %w", hostcheck.QEMU, err)
	}
	var v qmp.Version
	if m := regexp.MustCompile(`version (\d+)\.(\d+)\.(\d+)`).FindSubmatch(vout); m != nil {
		v.Major, _ = strconv.Atoi(string(m[1]))
		v.Minor, _ = strconv.Atoi(string(m[2]))
		v.Micro, _ = strconv.Atoi(string(m[3]))
	}
	return ms, v, nil
}

// IncomingError lists every reason this host cannot receive a VM; nothing
// was made. It matches errdefs.ErrFailedPrecondition (or the kind of its
// only problem), and its remedies are those of all its problems.
type IncomingError struct {
	VM       string
	Problems []error
}

func (e *IncomingError) Error() string {
	return listProblems(fmt.Sprintf("this host cannot receive VM %s (nothing was made here):", e.VM), e.Problems)
}

func (e *IncomingError) Unwrap() []error { return e.Problems }

// Is matches errdefs.ErrFailedPrecondition.
func (e *IncomingError) Is(target error) bool { return target == errdefs.ErrFailedPrecondition }

// Remedies are the union of the problems' remedies.
func (e *IncomingError) Remedies() []errdefs.Remedy {
	return (&PreflightError{Problems: e.Problems}).Remedies()
}

// incomingDir is where a VM received by migration is put.
func (h *Registry) incomingDir(c *Config) string { return filepath.Join(h.VMsDir(), c.Name) }

// PreflightIncoming checks, without making anything, that this host can
// receive the VM spec describes: no VM of that name or UUID here, its
// bundle directory free, QEMU knows the source's machine type and is not
// older than the source's, the firmware, direct-boot files and shared
// disks are here, the copied disks fit, the isolation the VM's policy
// requires is available, and a guardian here opens the TPM's key protector
// whose owner this host trusts. It returns the parsed vm.json.
func (h *Registry) PreflightIncoming(ctx context.Context, spec *IncomingSpec) (*Config, error) {
	hc, err := h.HostConfig()
	if err != nil {
		return nil, err
	}
	var tmp Config
	if err := json.Unmarshal(spec.Config, &tmp); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "the VM's %s does not parse", ConfigFile)
	}
	if err := validName(tmp.Name); err != nil {
		return nil, err
	}
	dir := h.incomingDir(&tmp)
	c, err := ParseConfig(spec.Config, dir, hc)
	if err != nil {
		return nil, err
	}
	var probs []error
	add := func(kind error, format string, a ...any) { probs = append(probs, errdefs.New(kind, format, a...)) }
	if e, err := h.Find(c.Name); err == nil {
		add(errdefs.ErrAlreadyExists, "a VM named %s is registered here (%s)", c.Name, e.Path)
	}
	if e, err := h.Find(c.UUID.String()); err == nil && e.Name != c.Name {
		add(errdefs.ErrAlreadyExists, "a VM with UUID %s is registered here: %s (%s)", c.UUID, e.Name, e.Path)
	}
	if _, err := os.Lstat(dir); err == nil {
		add(errdefs.ErrAlreadyExists, "%s exists here; the VM's bundle would go there", dir)
	}
	if err := hostcheck.QEMUUsable(); err != nil {
		probs = append(probs, err)
	} else if c.TPMEnabled() {
		if err := hostcheck.TPMEmulatorUsable(); err != nil {
			probs = append(probs, err)
		}
	}
	if ms, ver, err := qemuMachines(ctx); err != nil {
		probs = append(probs, err)
	} else {
		if !ms[spec.Machine] {
			add(errdefs.ErrFailedPrecondition, "QEMU %s here has no machine type %s, which the VM runs on (QEMU %s there)", ver, spec.Machine, spec.QEMU)
		}
		if ver.Less(qmp.Version{Major: spec.QEMU.Major, Minor: spec.QEMU.Minor}) {
			add(errdefs.ErrFailedPrecondition, "QEMU here is %s, older than the VM's QEMU %s: a migration goes to the same or a newer QEMU", ver, spec.QEMU)
		}
	}
	if c.Firmware == UEFI {
		code, _ := firmwareFiles(c)
		if _, err := os.Stat(code); err != nil {
			add(errdefs.ErrFailedPrecondition, "UEFI firmware %s is missing here (apt-get install ovmf): %v", code, err)
		}
		if _, ok := spec.Files[VarsFile]; !ok {
			add(errdefs.ErrInvalidArgument, "the VM's UEFI variable store did not come with it")
		}
	}
	for _, f := range []struct{ what, path string }{{"kernel", c.Kernel}, {"initrd", c.Initrd}} {
		switch {
		case f.path == "":
		case filepath.IsAbs(f.path):
			if _, err := os.Stat(f.path); err != nil {
				add(errdefs.ErrFailedPrecondition, "the %s for direct boot, %s, is not on this host: %v", f.what, f.path, err)
			}
		default:
			if _, ok := spec.Files[f.path]; !ok {
				add(errdefs.ErrInvalidArgument, "the %s for direct boot, %s, did not come with the VM", f.what, f.path)
			}
		}
	}
	for rel := range spec.Files {
		// Only the files vm.json names travel, and only into the bundle.
		if !filepath.IsLocal(rel) || (rel != VarsFile && rel != c.Kernel && rel != c.Initrd) {
			add(errdefs.ErrInvalidArgument, "file %q came with the VM; only its variable store and boot files may", rel)
		}
	}
	if len(spec.Disks) != len(c.Disks) {
		add(errdefs.ErrInvalidArgument, "%d disk sizes for %d disks", len(spec.Disks), len(c.Disks))
	} else {
		var need int64
		for i, d := range c.Disks {
			in := spec.Disks[i]
			switch {
			case in.Shared && !filepath.IsAbs(d.Path):
				add(errdefs.ErrInvalidArgument, "disk %s is in the bundle, and cannot be shared storage", d.Path)
			case in.Shared:
				if st, err := os.Stat(d.Path); err != nil {
					add(errdefs.ErrFailedPrecondition, "disk %s is outside the VM's bundle, so it must be shared storage, and this host does not see it: %v", d.Path, err)
				} else if d.Format == "raw" && st.Mode().IsRegular() && st.Size() != in.Size {
					add(errdefs.ErrFailedPrecondition, "disk %s is %d bytes here and %d bytes on the source: not the same storage", d.Path, st.Size(), in.Size)
				} else if err := sharedHere(d, in); err != nil {
					probs = append(probs, err)
				}
			case in.Size <= 0 || in.Size > MaxDiskSize:
				add(errdefs.ErrInvalidArgument, "disk %s: size %d out of range", d.Path, in.Size)
			default:
				need += in.Size
			}
		}
		for _, b := range spec.Files {
			need += int64(len(b))
		}
		if free, err := freeBytes(h.Root); err == nil && free < need {
			add(errdefs.ErrFailedPrecondition, "the VM needs %s here for its disks and files, and %s has %s free", FormatSize(need), h.Root, FormatSize(free))
		}
	}
	if c.TPMEnabled() {
		if err := CanHaveTPM(c); err != nil {
			probs = append(probs, err)
		}
		if c.IsolationPolicy() == sandbox.Required {
			probs = append(probs, isolationProblems(c.Name)...)
		}
		if err := h.checkIncomingTPM(filepath.Join(dir, TPMDir), spec.Protector); err != nil {
			probs = append(probs, err)
		}
	}
	if len(probs) > 0 {
		return nil, &IncomingError{VM: c.Name, Problems: probs}
	}
	return c, nil
}

// checkIncomingTPM opens (reading only) the data key the protector holds,
// as the vTPM instance will when the TPM's state arrives.
func (h *Registry) checkIncomingTPM(dir string, protector []byte) error {
	if len(protector) == 0 {
		return errdefs.New(errdefs.ErrInvalidArgument, "the VM has a TPM, and its key protector did not come with it")
	}
	p, err := guardian.ParseProtector(protector)
	if err != nil {
		return errdefs.Wrap(errdefs.ErrPermissionDenied, err, "the TPM's key protector is rejected")
	}
	k, err := h.keys()
	if err != nil {
		return fmt.Errorf("open this host's keystore: %w", err)
	}
	defer k.Close()
	o, err := k.OpenProtector(dir, p, keybroker.OpenOptions{})
	var missing *keybroker.MissingKeyError
	if errors.As(err, &missing) && h.HostSocket != "" {
		if _, ok := hostsvc.FleetRow(h.Root, missing.Rows); ok {
			// The protector has the row of the fleet guardian this
			// host's service asks the key service for: the vTPM adopts
			// the TPM through that service, with the key it releases
			// then (asking here would release it twice).
			return nil
		}
	}
	if err != nil {
		return err
	}
	o.Close()
	return nil
}

func freeBytes(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// IncomingOptions control how a received VM's QEMU runs.
type IncomingOptions struct {
	// Accel, SerialSocket: as for Start.
	Accel        string
	SerialSocket string
}

// PrepareIncoming makes the bundle of the VM spec describes, unregistered
// and marked as incoming (blank disks of the source's sizes, the variable
// store and boot files that came with it, an empty TPM directory), starts
// its vTPM instance on the empty directory (it adopts the TPM from the
// migration stream) and QEMU paused, waiting for an incoming migration
// (-incoming defer -S). On failure nothing is left.
func (h *Registry) PrepareIncoming(ctx context.Context, spec *IncomingSpec, o IncomingOptions) (_ *VM, err error) {
	c, err := h.PreflightIncoming(ctx, spec)
	if err != nil {
		return nil, err
	}
	accel, err := hostcheck.Accel(o.Accel)
	if err != nil {
		return nil, err
	}
	dir := h.incomingDir(c)
	if err := os.MkdirAll(h.VMsDir(), 0o700); err != nil {
		return nil, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create the VM's bundle: %w", err)
	}
	v := &VM{Dir: dir, Config: c, host: h}
	defer func() {
		if err != nil {
			h.AbortIncoming(context.Background(), v)
		}
	}()
	if err := os.WriteFile(filepath.Join(dir, incomingMark), nil, 0o600); err != nil {
		return nil, err
	}
	for rel, b := range spec.Files {
		p := filepath.Join(dir, rel)
		if !filepath.IsLocal(rel) {
			return nil, errdefs.New(errdefs.ErrInvalidArgument, "file %q would land outside the bundle", rel)
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			return nil, err
		}
	}
	for i, d := range c.Disks {
		if spec.Disks[i].Shared {
			continue
		}
		p := filepath.Join(dir, d.Path)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return nil, err
		}
		out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", d.Format, "--", p, strconv.FormatInt(spec.Disks[i].Size, 10)).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("create disk %s: %v: %s", d.Path, err, strings.TrimSpace(string(out)))
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, LogDir), 0o700); err != nil {
		return nil, err
	}
	if c.TPMEnabled() {
		if err := os.Mkdir(v.TPMDir(), 0o700); err != nil {
			return nil, err
		}
	}
	if err := v.Save(); err != nil {
		return nil, err
	}
	r := h.run(v)
	os.RemoveAll(r.Dir)
	if err := os.MkdirAll(r.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create run directory: %w", err)
	}
	if c.TPMEnabled() {
		if err := h.startTPMFor(ctx, v, r, true); err != nil {
			return nil, err
		}
	}
	qlog, err := os.OpenFile(filepath.Join(dir, LogDir, "qemu.log"), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer qlog.Close()
	so := StartOptions{SerialSocket: o.SerialSocket, Accel: accel, incoming: true, machine: spec.Machine}
	if _, err := h.startQEMU(ctx, v, r, accel, so, filepath.Join(dir, LogDir, "serial.log"), qlog); err != nil {
		return nil, err
	}
	return v, nil
}

// IncomingVM opens a VM this host is receiving (its bundle marked as
// incoming, not registered) by name.
func (h *Registry) IncomingVM(name string) (*VM, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	dir := filepath.Join(h.VMsDir(), name)
	if _, err := os.Stat(filepath.Join(dir, incomingMark)); err != nil {
		return nil, errdefs.New(errdefs.ErrNotFound, "no incoming VM %s here", name)
	}
	hc, err := h.HostConfig()
	if err != nil {
		return nil, err
	}
	c, err := ReadConfig(dir, hc)
	if err != nil {
		return nil, err
	}
	return &VM{Dir: dir, Config: c, host: h}, nil
}

// CommitIncoming registers a VM received by migration: from now on it is
// this host's.
func (h *Registry) CommitIncoming(v *VM) error {
	if _, err := os.Stat(filepath.Join(v.Dir, incomingMark)); err != nil {
		return fmt.Errorf("VM %s is not an incoming VM: %w", v.Name(), err)
	}
	if err := h.update(func(r *registry) error { return r.add(Entry{Name: v.Name(), UUID: v.Config.UUID, Path: v.Dir}) }); err != nil {
		return err
	}
	return os.Remove(filepath.Join(v.Dir, incomingMark))
}

// AbortIncoming stops the QEMU and vTPM of a VM this host was receiving
// and removes its bundle; a registered VM is left alone.
func (h *Registry) AbortIncoming(ctx context.Context, v *VM) error {
	if _, err := os.Stat(filepath.Join(v.Dir, incomingMark)); err != nil {
		return fmt.Errorf("VM %s is not an incoming VM: %w", v.Name(), err)
	}
	r := h.run(v)
	if pid := livePid(r.QEMUPid, filepath.Base(r.Dir)); pid != 0 {
		syscall.Kill(pid, syscall.SIGKILL)
		waitGone(ctx, pid, 10*time.Second)
	}
	if pid := livePid(r.TPMPid, r.Dir); pid != 0 {
		syscall.Kill(pid, syscall.SIGKILL)
		waitGone(ctx, pid, 10*time.Second)
	}
	os.RemoveAll(r.Dir)
	if err := os.RemoveAll(v.Dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// DialQMP opens a session on a running VM's monitor.
func (h *Registry) DialQMP(ctx context.Context, v *VM) (*qmp.Conn, error) {
	r := h.run(v)
	dctx, cancel := context.WithTimeout(ctx, qmpTimeout)
	defer cancel()
	q, err := qmp.Dial(dctx, r.QMP, h.log())
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", v.Name(), err)
	}
	return q, nil
}

// QEMUUserOf is whom v's QEMU runs as (uid, gid): files QEMU reads by path
// are given to it.
func QEMUUserOf(v *VM) (uid, gid int, err error) {
	_, uid, gid, err = hostcheck.QEMUUser(v.Config.QEMUUser)
	return uid, gid, err
}

// Retire removes a VM that now runs on another host: its QEMU is told to
// quit, its vTPM exits, its TPM state is moved to a backup under the data
// root and the rest of what vtpm made in its bundle goes; the VM is
// unregistered.
func (h *Registry) Retire(ctx context.Context, v *VM) (*Deleted, error) {
	if _, err := h.Stop(ctx, v, 0); err != nil {
		return nil, err
	}
	return h.Delete(v, false)
}

// CleanIncoming removes what migrations into this host left half-done
// (a host service that stopped mid-way): the QEMU and vTPM of every
// bundle still marked as incoming, and the bundle. A host service calls it
// when it starts. It returns the names of the VMs removed.
func (h *Registry) CleanIncoming(ctx context.Context) ([]string, error) {
	entries, err := os.ReadDir(h.VMsDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var gone []string
	var errs []error
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(h.VMsDir(), e.Name())
		if _, err := os.Stat(filepath.Join(dir, incomingMark)); err != nil {
			continue
		}
		// The bundle's vm.json may be missing or bad: the directory's
		// name is the VM's, which is all the run paths need.
		v := &VM{Dir: dir, Config: &Config{Name: e.Name()}, host: h}
		if err := h.AbortIncoming(ctx, v); err != nil {
			errs = append(errs, err)
			continue
		}
		gone = append(gone, e.Name())
	}
	return gone, errors.Join(errs...)
}
