package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// harnessVersion is part of every cache key: bump it when the layout of the
// cached kernel or base initramfs changes.
const harnessVersion = "3"

// kernelMeta is the Debian 12 meta-package whose dependency names the newest
// 6.12 kernel image (from bookworm-security / bookworm-backports).
const kernelMeta = "linux-image-6.12-amd64"

// AvailableModules are the kernel modules kept in the cache and copied into
// every initramfs, with their dependencies (soft ones included).
var AvailableModules = []string{"nbd", "ublk_drv", "loop", "ext4"}

// DefaultModules are insmod'ed at boot unless Guest.Modules says otherwise.
var DefaultModules = AvailableModules

// baseTools are host executables copied into the base initramfs with the
// shared libraries they need, at the same paths as on the host. Symlinks
// maps extra names onto them.
var baseTools = []string{"nbd-client", "mke2fs", "e2fsck", "tune2fs", "dumpe2fs"}

var baseSymlinks = map[string]string{
	"mkfs.ext4": "mke2fs",
	"fsck.ext4": "e2fsck",
}

// Image is a prepared kernel plus the cached base initramfs layer.
type Image struct {
	KernelVersion string              // e.g. 6.12.117+deb12-amd64
	Kernel        string              // path of the vmlinuz
	BaseInitrd    string              // path of the base cpio archive
	modules       map[string][]string // module name -> insmod lines (path args), deps first
}

var (
	prepOnce sync.Once
	prepImg  *Image
	prepErr  error
)

// CacheDir is where the kernel and the initramfs layers are kept between runs:
// $BLOCKD_VMTEST_CACHE, else the user cache dir (~/.cache/blockd-vmtest).
func CacheDir() string {
	if d := os.Getenv("BLOCKD_VMTEST_CACHE"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "blockd-vmtest")
	}
	return filepath.Join(os.TempDir(), "blockd-vmtest")
}

// Prepare fetches the kernel (once per cache) and builds the base initramfs
// (once per set of host tools). It is safe to call from several processes at
// once: they serialise on a lock file in the cache dir.
func Prepare(ctx context.Context) (*Image, error) {
	prepOnce.Do(func() { prepImg, prepErr = prepare(ctx) })
	return prepImg, prepErr
}

func prepare(ctx context.Context) (*Image, error) {
	dir := CacheDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("vmtest: cache dir: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(dir, "lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	kdir, err := ensureKernel(ctx, dir)
	if err != nil {
		return nil, err
	}
	img := &Image{modules: map[string][]string{}}
	img.KernelVersion = strings.TrimPrefix(filepath.Base(kdir), "kernel-")
	img.Kernel = filepath.Join(kdir, "vmlinuz")
	list, err := os.ReadFile(filepath.Join(kdir, "modules.list"))
	if err != nil {
		return nil, fmt.Errorf("vmtest: kernel cache: %w", err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(list)), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		img.modules[name] = append(img.modules[name], strings.TrimSpace(rest))
	}
	img.BaseInitrd, err = ensureBase(ctx, dir, kdir, img)
	if err != nil {
		return nil, err
	}
	return img, nil
}

func lockFile(ctx context.Context, p string) (func(), error) {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("vmtest: lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { _ = unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("vmtest: lock %s: %w", p, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("vmtest: waiting for cache lock %s: %w", p, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func run(ctx context.Context, dir string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("vmtest: %s %s: %w: %s", name, strings.Join(args, " "), err, lastLines(out.String(), 10))
	}
	return out.String(), nil
}

var kernelPkgRe = regexp.MustCompile(`linux-image-6\.12\.[0-9]+\+deb12-amd64`)

// kernelPackage names the kernel image package to fetch.
func kernelPackage(ctx context.Context) (string, error) {
	if p := os.Getenv("BLOCKD_VMTEST_KERNEL_PKG"); p != "" {
		return p, nil
	}
	for attempt := 0; attempt < 2; attempt++ {
		out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", kernelMeta)
		if err == nil {
			for _, line := range strings.Split(out, "\n") {
				if strings.HasPrefix(line, "Depends:") {
					if m := kernelPkgRe.FindString(line); m != "" {
						return m, nil
					}
				}
			}
		}
		if attempt == 0 {
			// The package lists may be missing or stale on a fresh machine.
			if _, err := run(ctx, "", "apt-get", "update", "-qq"); err != nil {
				return "", err
			}
		}
	}
	return "", fmt.Errorf("vmtest: apt-cache knows no %s: add bookworm-security to the apt sources (scripts/install-deps.sh does) or set BLOCKD_VMTEST_KERNEL_PKG", kernelMeta)
}

// ensureKernel returns the cache directory of a ready kernel, fetching and
// unpacking one if the cache has none.
func ensureKernel(ctx context.Context, cache string) (string, error) {
	want := os.Getenv("BLOCKD_VMTEST_KERNEL_PKG")
	if want == "" {
		// Any ready kernel will do: the cache works offline.
		ready, _ := filepath.Glob(filepath.Join(cache, "kernel-*", "ready-"+harnessVersion))
		sort.Strings(ready)
		if len(ready) > 0 {
			return filepath.Dir(ready[len(ready)-1]), nil
		}
	}
	pkg, err := kernelPackage(ctx)
	if err != nil {
		return "", err
	}
	kver := strings.TrimPrefix(pkg, "linux-image-")
	kdir := filepath.Join(cache, "kernel-"+kver)
	if _, err := os.Stat(filepath.Join(kdir, "ready-"+harnessVersion)); err == nil {
		return kdir, nil
	}
	for _, tool := range []string{"apt-get", "dpkg-deb", "depmod", "modprobe", "xz"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err2 := os.Stat("/usr/sbin/" + tool); err2 != nil && !strings.HasPrefix(tool, "dep") {
				return "", fmt.Errorf("vmtest: %s is needed to fetch the kernel: %w", tool, err)
			}
		}
	}
	tmp, err := os.MkdirTemp(cache, "fetch-")
	if err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	defer os.RemoveAll(tmp)
	if _, err := run(ctx, tmp, "apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", pkg); err != nil {
		return "", err
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("vmtest: apt-get download %s left %d .deb files", pkg, len(debs))
	}
	root := filepath.Join(tmp, "root")
	if _, err := run(ctx, tmp, "dpkg-deb", "-x", debs[0], root); err != nil {
		return "", err
	}
	vmlinuz := filepath.Join(root, "boot", "vmlinuz-"+kver)
	if _, err := os.Stat(vmlinuz); err != nil {
		return "", fmt.Errorf("vmtest: %s has no vmlinuz: %w", pkg, err)
	}
	// The .deb ships no modules.dep.
	if _, err := run(ctx, "", sbin("depmod"), "-b", root, kver); err != nil {
		return "", err
	}
	stage := filepath.Join(tmp, "kernel")
	if err := os.MkdirAll(filepath.Join(stage, "modules"), 0o755); err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	if _, err := run(ctx, "", "cp", vmlinuz, filepath.Join(stage, "vmlinuz")); err != nil {
		return "", err
	}
	modRoot := filepath.Join(root, "lib", "modules", kver)
	var list strings.Builder
	copied := map[string]bool{}
	for _, m := range AvailableModules {
		// Soft dependencies included (ext4 needs crc32c): busybox modprobe
		// ignores them, so the guest insmods in this order instead.
		out, err := run(ctx, "", sbin("modprobe"), "-C", "/dev/null", "-d", root, "-S", kver, "--show-depends", m)
		if err != nil {
			return "", err
		}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "insmod" {
				continue // builtin
			}
			rel, err := filepath.Rel(modRoot, f[1])
			if err != nil {
				return "", fmt.Errorf("vmtest: module path %s: %w", f[1], err)
			}
			rel = strings.TrimSuffix(rel, ".xz")
			if !copied[rel] {
				copied[rel] = true
				dst := filepath.Join(stage, "modules", rel)
				if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
					return "", fmt.Errorf("vmtest: %w", err)
				}
				data, err := exec.CommandContext(ctx, "xz", "-dc", f[1]).Output()
				if err != nil {
					return "", fmt.Errorf("vmtest: xz -dc %s: %w", f[1], err)
				}
				if err := os.WriteFile(dst, data, 0o644); err != nil {
					return "", fmt.Errorf("vmtest: %w", err)
				}
			}
			fmt.Fprintf(&list, "%s:%s\n", m, strings.Join(append([]string{rel}, f[2:]...), " "))
		}
	}
	if err := os.WriteFile(filepath.Join(stage, "modules.list"), []byte(list.String()), 0o644); err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	if err := os.WriteFile(filepath.Join(stage, "package"), []byte(pkg+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	if err := os.WriteFile(filepath.Join(stage, "ready-"+harnessVersion), nil, 0o644); err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	_ = os.RemoveAll(kdir)
	if err := os.Rename(stage, kdir); err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	return kdir, nil
}

func sbin(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		if _, err := os.Stat(d + "/" + name); err == nil {
			return d + "/" + name
		}
	}
	return name
}

// toolFiles resolves host executables (by name or path) to the files to copy:
// the executable itself and every shared library ldd lists (the dynamic
// loader included). Symlinked libraries are copied under the name ldd gives.
func toolFiles(ctx context.Context, tools []string) (map[string]string, error) {
	files := map[string]string{} // guest path -> host path
	for _, t := range tools {
		p := t
		if !strings.Contains(t, "/") {
			p = sbin(t)
			if !filepath.IsAbs(p) {
				return nil, fmt.Errorf("vmtest: tool %q not found on the host (run scripts/install-deps.sh)", t)
			}
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			return nil, fmt.Errorf("vmtest: tool %s: %w", t, err)
		}
		files[p] = real
		out, err := exec.CommandContext(ctx, "ldd", real).CombinedOutput()
		if err != nil {
			if strings.Contains(string(out), "not a dynamic executable") {
				continue
			}
			return nil, fmt.Errorf("vmtest: ldd %s: %w: %s", real, err, out)
		}
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			var lib string
			switch {
			case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
				lib = f[2]
			case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
				lib = f[0] // the dynamic loader
			case len(f) >= 3 && f[1] == "=>" && f[2] == "not":
				return nil, fmt.Errorf("vmtest: %s: library %s not found", real, f[0])
			default:
				continue
			}
			r, err := filepath.EvalSymlinks(lib)
			if err != nil {
				return nil, fmt.Errorf("vmtest: %s: %w", lib, err)
			}
			files[lib] = r
		}
	}
	return files, nil
}

// ensureBase builds (or finds) the base initramfs layer: busybox, the init
// script, the modules and the base tools.
func ensureBase(ctx context.Context, cache, kdir string, img *Image) (string, error) {
	busybox := "/bin/busybox"
	if p, err := exec.LookPath("busybox"); err == nil {
		busybox = p
	}
	if out, err := exec.CommandContext(ctx, "ldd", busybox).CombinedOutput(); err == nil || !strings.Contains(string(out), "not a dynamic") {
		return "", fmt.Errorf("vmtest: %s is not a static busybox (install busybox-static)", busybox)
	}
	tools, err := toolFiles(ctx, baseTools)
	if err != nil {
		return "", err
	}
	// The cache key covers everything that goes in.
	h := sha256.New()
	fmt.Fprintf(h, "v%s %s %s\n", harnessVersion, kdir, initScript)
	for _, g := range append(sortedKeys(tools), busybox) {
		src := tools[g]
		if src == "" {
			src = g
		}
		fi, err := os.Stat(src)
		if err != nil {
			return "", fmt.Errorf("vmtest: %w", err)
		}
		fmt.Fprintf(h, "%s %s %d %d\n", g, src, fi.Size(), fi.ModTime().UnixNano())
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	out := filepath.Join(cache, "base-"+key+".cpio")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	old, _ := filepath.Glob(filepath.Join(cache, "base-*.cpio"))
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	defer os.Remove(tmp)
	c := newCPIO(f)
	for _, d := range []string{"proc", "sys", "dev", "tmp", "run", "mnt", "root", "etc", "var/tmp", "usr/local/bin"} {
		c.mkdirAll(d)
	}
	c.hostFile("bin/busybox", busybox)
	toolNames := map[string]bool{}
	for g := range tools {
		toolNames[filepath.Base(g)] = true
	}
	for n := range baseSymlinks {
		toolNames[n] = true
	}
	list, err := exec.CommandContext(ctx, busybox, "--list-full").Output()
	if err != nil {
		return "", fmt.Errorf("vmtest: busybox --list-full: %w", err)
	}
	for _, applet := range strings.Fields(string(list)) {
		// busybox lists itself: a self-symlink makes the guest panic (-40).
		if filepath.Base(applet) == "busybox" || toolNames[filepath.Base(applet)] {
			continue
		}
		c.symlink(applet, "/bin/busybox")
	}
	for _, g := range sortedKeys(tools) {
		c.hostFile(g, tools[g])
	}
	for name, target := range baseSymlinks {
		for g := range tools {
			if filepath.Base(g) == target {
				c.symlink(filepath.Join(filepath.Dir(g), name), target)
			}
		}
	}
	if _, err := os.Stat("/etc/mke2fs.conf"); err == nil {
		c.hostFile("etc/mke2fs.conf", "/etc/mke2fs.conf")
	}
	c.file("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644)
	c.file("etc/group", []byte("root:x:0:\n"), 0o644)
	c.file("etc/hosts", []byte("127.0.0.1 localhost vmtest\n::1 localhost\n"), 0o644)
	c.file("etc/mtab", []byte{}, 0o644)
	modDir := filepath.Join(kdir, "modules")
	err = filepath.Walk(modDir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(modDir, p)
		c.hostFile(filepath.Join("lib/modules", img.KernelVersion, rel), p)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("vmtest: modules: %w", err)
	}
	c.file("init", []byte(initScript), 0o755)
	if err := c.close(); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", fmt.Errorf("vmtest: %w", err)
	}
	for _, o := range old {
		_ = os.Remove(o)
	}
	return out, nil
}

// initScript is the guest's /init. The per-run layer supplies
// /vmtest/modules (insmod lines), /vmtest/env and /vmtest/script.
const initScript = `#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
hostname vmtest
ip link set lo up
if [ -d /sys/kernel/config ]; then mount -t configfs configfs /sys/kernel/config 2>/dev/null; fi
while read -r mod args; do
	[ -n "$mod" ] || continue
	insmod "/lib/modules/$(uname -r)/$mod" $args || echo "vmtest: insmod $mod failed"
done < /vmtest/modules
echo "vmtest: guest ready, kernel $(uname -r), $(nproc) cpus"
cd /root
[ -f /vmtest/env ] && . /vmtest/env
/bin/sh -e /vmtest/script < /dev/null
rc=$?
sync
echo
echo "<<<vmtest-exit:$rc>>>"
poweroff -f
`

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
