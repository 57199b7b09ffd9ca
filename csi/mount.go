package csi

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The node's tools: mountinfo, file-system detection, mkfs, mount and
// resize. Detection is pure (a function of the device's first bytes).

// mountEntry is one line of /proc/self/mountinfo.
type mountEntry struct {
	Major, Minor uint32
	Root         string // the mounted subtree of the source ("/" or "/nbd0" for a device bind)
	Target       string
	FSType       string
	Source       string
	Options      string // per-mount options (ro, rw, ...)
}

// parseMountinfo parses /proc/self/mountinfo text.
func parseMountinfo(text string) []mountEntry {
	var out []mountEntry
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		sep := -1
		for i, x := range f {
			if x == "-" {
				sep = i
				break
			}
		}
		if len(f) < 6 || sep < 6 || sep+2 >= len(f) {
			continue
		}
		mm := strings.SplitN(f[2], ":", 2)
		if len(mm) != 2 {
			continue
		}
		ma, err1 := strconv.ParseUint(mm[0], 10, 32)
		mi, err2 := strconv.ParseUint(mm[1], 10, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, mountEntry{Major: uint32(ma), Minor: uint32(mi), Root: unescape(f[3]), Target: unescape(f[4]),
			Options: f[5], FSType: f[sep+1], Source: unescape(f[sep+2])})
	}
	return out
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func mounts() ([]mountEntry, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return parseMountinfo(string(b)), nil
}

// mountAt returns the topmost mount at path (nil when path is not a mount point).
func mountAt(path string) (*mountEntry, error) {
	ms, err := mounts()
	if err != nil {
		return nil, err
	}
	path = filepath.Clean(path)
	var found *mountEntry
	for i := range ms {
		if ms[i].Target == path {
			found = &ms[i]
		}
	}
	return found, nil
}

// mountsOfDevice lists the mount points of the block device with rdev
// major:minor (file-system mounts and their binds).
func mountsOfDevice(major, minor uint32) ([]string, error) {
	ms, err := mounts()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range ms {
		if m.Major == major && m.Minor == minor {
			out = append(out, m.Target)
		}
	}
	return out, nil
}

// devNumbers returns the major:minor of a device node.
func devNumbers(path string) (uint32, uint32, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, 0, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, 0, fmt.Errorf("%s is not a block device", path)
	}
	return unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)), nil
}

// deviceSize returns a block device's size in bytes.
func deviceSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("%s: BLKGETSIZE64: %w", path, err)
	}
	return int64(n), nil
}

// probeBytes is how much of a device detectFS looks at.
const probeBytes = 128 << 10

// detectFS names the file system in a device's first bytes: "ext4" (any
// ext2/3/4 superblock), "xfs", "" for all zeroes (blank), or "unknown"
// for data it does not recognise (never formatted over).
func detectFS(head []byte) string {
	if len(head) >= 1082 && head[1080] == 0x53 && head[1081] == 0xEF {
		return "ext4"
	}
	if len(head) >= 4 && bytes.Equal(head[:4], []byte("XFSB")) {
		return "xfs"
	}
	for _, b := range head {
		if b != 0 {
			return "unknown"
		}
	}
	return ""
}

func readHead(dev string) ([]byte, error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dev, err)
	}
	defer f.Close()
	buf := make([]byte, probeBytes)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, fmt.Errorf("read %s: %w", dev, err)
	}
	return buf[:n], nil
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// mkfs makes fsType on dev.
func mkfs(dev, fsType string) error {
	switch fsType {
	case "ext4":
		return run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev)
	case "xfs":
		return run("mkfs.xfs", "-q", "-K", dev)
	}
	return fmt.Errorf("mkfs: unsupported file system %q", fsType)
}

// growFS grows the file system mounted at path on dev to fill the device.
func growFS(dev, fsType, path string) error {
	switch fsType {
	case "ext4", "ext3", "ext2":
		return run("resize2fs", dev)
	case "xfs":
		return run("xfs_growfs", path)
	}
	return fmt.Errorf("grow: unsupported file system %q", fsType)
}

// mountFlags splits mount options into flags and file-system data.
func mountFlags(opts []string) (uintptr, string) {
	known := map[string]uintptr{
		"ro": unix.MS_RDONLY, "nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV, "noexec": unix.MS_NOEXEC,
		"sync": unix.MS_SYNCHRONOUS, "noatime": unix.MS_NOATIME, "nodiratime": unix.MS_NODIRATIME,
		"relatime": unix.MS_RELATIME, "dirsync": unix.MS_DIRSYNC, "rw": 0, "defaults": 0,
	}
	var flags uintptr
	var data []string
	for _, o := range opts {
		for _, x := range strings.Split(o, ",") {
			if x = strings.TrimSpace(x); x == "" {
				continue
			}
			if f, ok := known[x]; ok {
				flags |= f
			} else {
				data = append(data, x)
			}
		}
	}
	return flags, strings.Join(data, ",")
}

// mountFS mounts dev (fsType) at target.
func mountFS(dev, target, fsType string, opts []string, readOnly bool) error {
	flags, data := mountFlags(opts)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(dev, target, fsType, flags, data); err != nil {
		return fmt.Errorf("mount %s (%s) at %s: %w", dev, fsType, target, err)
	}
	return nil
}

// bindMount binds src at target, read-only if asked (a second remount:
// MS_RDONLY is ignored on the first bind).
func bindMount(src, target string, readOnly bool, opts []string) error {
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s at %s: %w", src, target, err)
	}
	flags, _ := mountFlags(opts)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	if flags != 0 {
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|flags, ""); err != nil {
			_ = unix.Unmount(target, 0)
			return fmt.Errorf("remount %s with %#x: %w", target, flags, err)
		}
	}
	return nil
}

// unmount unmounts target if it is a mount point (every stacked mount).
func unmount(target string) error {
	for {
		m, err := mountAt(target)
		if err != nil {
			return err
		}
		if m == nil {
			return nil
		}
		if err := unix.Unmount(target, 0); err != nil {
			return fmt.Errorf("unmount %s: %w", target, err)
		}
	}
}
