package qemutest

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

//go:embed guest/init
var guestInit []byte

//go:embed guest/tpmtest.sh
var guestTPMTest []byte

// imageFormat changes whenever the image layout changes in a way the other
// cache-key inputs do not capture.
const imageFormat = "qemutest-image-v1"

// Image is a built guest: a kernel and an initramfs for direct kernel boot.
type Image struct {
	Kernel        string // path of vmlinuz
	Initrd        string // path of the gzip'ed newc initramfs
	KernelPackage string // Debian package the kernel came from, e.g. linux-image-6.1.0-56-cloud-amd64
	Dir           string // cache directory holding both
}

var (
	imageMu     sync.Mutex
	cachedImage *Image
)

// BuildImage returns the shared guest image, building it on first use. The
// result is cached on disk (keyed by a hash of every build input) and in the
// process, so calling it from every test is cheap.
func BuildImage(ctx context.Context) (*Image, error) {
	imageMu.Lock()
	defer imageMu.Unlock()
	if cachedImage != nil {
		return cachedImage, nil
	}
	img, err := buildImage(ctx)
	if err != nil {
		return nil, err
	}
	cachedImage = img
	return img, nil
}

// CacheDir is where built images live: $VTPM_TEST_CACHE, or .cache/guest at
// the module root.
func CacheDir() (string, error) {
	if d := os.Getenv("VTPM_TEST_CACHE"); d != "" {
		return filepath.Abs(d)
	}
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "guest"), nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find module root: no go.mod above the working directory")
		}
		dir = parent
	}
}

// guestFile is a host file copied into the initramfs.
type guestFile struct {
	host  string // path on the host (symlinks are followed)
	guest string // path inside the guest, relative
}

func buildImage(ctx context.Context) (*Image, error) {
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, fmt.Errorf("create image cache: %w", err)
	}
	pkg, pkgVersion, err := newestCloudKernel(ctx)
	if err != nil {
		return nil, err
	}
	files, links, err := hostFiles(ctx)
	if err != nil {
		return nil, err
	}
	key, err := cacheKey(pkg, pkgVersion, files, links)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cache, key)
	img := &Image{
		Kernel:        filepath.Join(dir, "vmlinuz"),
		Initrd:        filepath.Join(dir, "initrd.img"),
		KernelPackage: pkg,
		Dir:           dir,
	}
	if _, err := os.Stat(dir); err == nil {
		return img, nil
	}

	// Another test binary may be building the same image right now.
	unlock, err := lockFile(ctx, filepath.Join(cache, ".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := os.Stat(dir); err == nil {
		return img, nil
	}
	slog.Info("building guest image", "dir", dir, "kernel", pkg, "version", pkgVersion)
	tmp, err := os.MkdirTemp(cache, ".build-")
	if err != nil {
		return nil, fmt.Errorf("create image build dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := fetchKernel(ctx, pkg, tmp); err != nil {
		return nil, err
	}
	mods, _ := filepath.Glob(filepath.Join(tmp, "modules", "*.ko"))
	for _, m := range mods {
		files = append(files, guestFile{host: m, guest: "usr/lib/modules/" + filepath.Base(m)})
	}
	if err := writeInitramfs(filepath.Join(tmp, "initrd.img"), files, links); err != nil {
		return nil, err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("chmod image dir: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return nil, fmt.Errorf("publish guest image: %w", err)
	}
	return img, nil
}

// lockFile takes an exclusive flock, giving up when ctx ends.
func lockFile(ctx context.Context, name string) (func(), error) {
	f, err := os.OpenFile(name, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open image lock: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- syscall.Flock(int(f.Fd()), syscall.LOCK_EX) }()
	select {
	case err := <-done:
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", name, err)
		}
		return func() { f.Close() }, nil
	case <-ctx.Done():
		// Closing the file does not interrupt flock; the goroutine ends
		// when the holder releases the lock.
		go func() { <-done; f.Close() }()
		return nil, fmt.Errorf("lock %s: %w", name, ctx.Err())
	}
}

var cloudKernelRE = regexp.MustCompile(`^linux-image-6\.1\.0-(\d+)-cloud-amd64$`)

// newestCloudKernel picks the highest ABI of Debian's 6.1 cloud kernel
// known to apt and returns its package name and version.
func newestCloudKernel(ctx context.Context) (pkg, version string, err error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "search", "--names-only",
		`^linux-image-6\.1\.0-[0-9]+-cloud-amd64$`).Output()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache search for the cloud kernel: %w", err)
	}
	best := -1
	for line := range strings.Lines(string(out)) {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		m := cloudKernelRE.FindStringSubmatch(name)
		if m == nil {
			continue
		}
		abi, _ := strconv.Atoi(m[1])
		if abi > best {
			best, pkg = abi, name
		}
	}
	if pkg == "" {
		return "", "", errors.New("no linux-image-6.1.0-*-cloud-amd64 package known to apt (run apt-get update)")
	}
	out, err = exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", pkg).Output()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache show %s: %w", pkg, err)
	}
	for line := range strings.Lines(string(out)) {
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			return pkg, strings.TrimSpace(v), nil
		}
	}
	return "", "", fmt.Errorf("apt-cache show %s: no Version field", pkg)
}

// fetchKernel downloads the kernel package and unpacks it under dir without
// installing anything on the host; it keeps only vmlinuz and the config.
func fetchKernel(ctx context.Context, pkg, dir string) error {
	dl := filepath.Join(dir, "deb")
	if err := os.Mkdir(dl, 0o755); err != nil {
		return fmt.Errorf("create download dir: %w", err)
	}
	defer os.RemoveAll(dl)
	cmd := exec.CommandContext(ctx, "apt-get", "download", "-o", "APT::Sandbox::User=root", pkg)
	cmd.Dir = dl
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get download %s: %w: %s", pkg, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dl, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("apt-get download %s: expected one .deb, found %d", pkg, len(debs))
	}
	root := filepath.Join(dl, "root")
	if out, err := exec.CommandContext(ctx, "dpkg", "-x", debs[0], root).CombinedOutput(); err != nil {
		return fmt.Errorf("dpkg -x %s: %w: %s", debs[0], err, out)
	}
	release := strings.TrimPrefix(pkg, "linux-image-")
	config, err := os.ReadFile(filepath.Join(root, "boot", "config-"+release))
	if err != nil {
		return fmt.Errorf("read kernel config: %w", err)
	}
	// The guest has no modules, so everything it needs must be built in.
	for _, opt := range []string{"CONFIG_TCG_TPM", "CONFIG_TCG_TIS", "CONFIG_TCG_CRB", "CONFIG_SECURITYFS",
		"CONFIG_DEVTMPFS", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_RD_GZIP"} {
		if !bytes.Contains(config, []byte("\n"+opt+"=y\n")) {
			return fmt.Errorf("kernel %s: %s is not built in", pkg, opt)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "config"), config, 0o644); err != nil {
		return fmt.Errorf("save kernel config: %w", err)
	}
	// Virtio block is a module: the guest loads these (init, in this
	// order) to see a VM's disks.
	if err := os.Mkdir(filepath.Join(dir, "modules"), 0o755); err != nil {
		return err
	}
	for _, m := range guestModules {
		found, _ := filepath.Glob(filepath.Join(root, "lib", "modules", release, "kernel", "drivers", "*", m+".ko"))
		if len(found) != 1 {
			return fmt.Errorf("kernel %s: module %s.ko not found (%d matches)", pkg, m, len(found))
		}
		if err := os.Rename(found[0], filepath.Join(dir, "modules", m+".ko")); err != nil {
			return fmt.Errorf("save module %s: %w", m, err)
		}
	}
	if err := os.Rename(filepath.Join(root, "boot", "vmlinuz-"+release), filepath.Join(dir, "vmlinuz")); err != nil {
		return fmt.Errorf("save kernel: %w", err)
	}
	return nil
}

const libDir = "usr/lib/x86_64-linux-gnu"

// guestModules are the kernel modules the guest loads at boot (the guest's
// init names them in the same order): a VM's virtio disks.
var guestModules = []string{"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk"}

// hostFiles lists what the initramfs takes from the host: busybox, the
// tpm2-tools multi-call binary, the libraries both load (including the TCTI
// modules that libtss2-tctildr dlopen's, which ldd cannot see) and the
// dynamic loader. links maps guest symlinks to their targets.
func hostFiles(ctx context.Context) ([]guestFile, map[string]string, error) {
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return nil, nil, fmt.Errorf("busybox-static is needed for the test guest: %w", err)
	}
	tpm2, err := exec.LookPath("tpm2")
	if err != nil {
		return nil, nil, fmt.Errorf("tpm2-tools is needed for the test guest: %w", err)
	}
	files := []guestFile{
		{host: busybox, guest: "usr/bin/busybox"},
		{host: tpm2, guest: "usr/bin/tpm2"},
	}
	links := map[string]string{
		"bin":   "usr/bin",
		"sbin":  "usr/sbin",
		"lib":   "usr/lib",
		"lib64": "usr/lib64",
	}

	out, err := exec.CommandContext(ctx, busybox, "--list-full").Output()
	if err != nil {
		return nil, nil, fmt.Errorf("busybox --list-full: %w", err)
	}
	for line := range strings.Lines(string(out)) {
		applet := strings.TrimSpace(line)
		if applet == "" {
			continue
		}
		// Fold /bin and /sbin into /usr, as the merged-/usr links do.
		if !strings.HasPrefix(applet, "usr/") {
			applet = "usr/" + applet
		}
		links[applet] = "/usr/bin/busybox"
	}

	tools, err := filepath.Glob(filepath.Join(filepath.Dir(tpm2), "tpm2_*"))
	if err != nil {
		return nil, nil, fmt.Errorf("list tpm2 tools: %w", err)
	}
	for _, tool := range tools {
		if target, err := os.Readlink(tool); err == nil && filepath.Base(target) == "tpm2" {
			links["usr/bin/"+filepath.Base(tool)] = "tpm2"
		}
	}

	libs := map[string]bool{}
	tctis := []string{"libtss2-tcti-device.so.0", "libtss2-tctildr.so.0", "libtss2-tcti-cmd.so.0"}
	roots := []string{tpm2}
	for _, name := range tctis {
		p, err := findLib(name)
		if err != nil {
			return nil, nil, err
		}
		libs[p] = true
		roots = append(roots, p)
	}
	loader := ""
	for _, r := range roots {
		deps, ld, err := lddDeps(ctx, r)
		if err != nil {
			return nil, nil, err
		}
		for _, d := range deps {
			libs[d] = true
		}
		if ld != "" {
			loader = ld
		}
	}
	if loader == "" {
		return nil, nil, fmt.Errorf("ldd %s: no dynamic loader", tpm2)
	}
	names := make([]string, 0, len(libs))
	for l := range libs {
		names = append(names, l)
	}
	sort.Strings(names)
	for _, l := range names {
		files = append(files, guestFile{host: l, guest: libDir + "/" + filepath.Base(l)})
	}
	files = append(files, guestFile{host: loader, guest: "usr/lib64/" + filepath.Base(loader)})
	links[libDir+"/"+filepath.Base(loader)] = "/usr/lib64/" + filepath.Base(loader)
	return files, links, nil
}

func findLib(name string) (string, error) {
	for _, dir := range []string{"/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"} {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("library %s not found on the host (install libtss2-tcti-device0 and friends)", name)
}

// lddDeps returns the shared libraries a binary needs and its loader.
func lddDeps(ctx context.Context, bin string) (libs []string, loader string, err error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).Output()
	if err != nil {
		return nil, "", fmt.Errorf("ldd %s: %w", bin, err)
	}
	for line := range strings.Lines(string(out)) {
		fields := strings.Fields(line)
		switch {
		case len(fields) >= 3 && fields[1] == "=>" && strings.HasPrefix(fields[2], "/"):
			libs = append(libs, fields[2])
		case len(fields) >= 1 && strings.HasPrefix(fields[0], "/") && strings.Contains(fields[0], "ld-linux"):
			loader = fields[0]
		}
	}
	return libs, loader, nil
}

// cacheKey hashes every input of the image: the kernel package, the guest
// scripts and the contents of every host file copied in.
func cacheKey(pkg, version string, files []guestFile, links map[string]string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s %s\n", imageFormat, pkg, version)
	fmt.Fprintf(h, "init %x\ntpmtest %x\n", sha256.Sum256(guestInit), sha256.Sum256(guestTPMTest))
	for _, f := range files {
		data, err := os.ReadFile(f.host)
		if err != nil {
			return "", fmt.Errorf("hash guest input: %w", err)
		}
		fmt.Fprintf(h, "file %s %x\n", f.guest, sha256.Sum256(data))
	}
	names := make([]string, 0, len(links))
	for n := range links {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(h, "link %s %s\n", n, links[n])
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

func writeInitramfs(name string, files []guestFile, links map[string]string) error {
	tree := newCpioTree()
	for _, d := range []string{"dev", "proc", "sys", "tmp", "root", "etc", "usr/sbin", "run"} {
		tree.mkdirAll(d)
	}
	// The kernel opens /dev/console for init before devtmpfs is mounted.
	tree.add(cpioEntry{name: "dev/console", mode: cpioCharDev | 0o600, rdevMaj: 5, rdevMin: 1})
	tree.file("init", 0o755, guestInit)
	tree.file("usr/bin/tpmtest", 0o755, guestTPMTest)
	tree.file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	tree.file("etc/group", 0o644, []byte("root:x:0:\n"))
	for _, f := range files {
		data, err := os.ReadFile(f.host)
		if err != nil {
			return fmt.Errorf("read %s for the initramfs: %w", f.host, err)
		}
		tree.file(f.guest, fs.FileMode(0o755), data)
	}
	for n, target := range links {
		if _, ok := tree.entries[n]; ok {
			continue // a real file wins over a busybox applet of the same name
		}
		tree.symlink(n, target)
	}

	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	if err != nil {
		return fmt.Errorf("gzip initramfs: %w", err)
	}
	if err := tree.writeTo(zw); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("gzip initramfs: %w", err)
	}
	if err := os.WriteFile(name, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	return nil
}
