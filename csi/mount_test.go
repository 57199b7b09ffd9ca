package csi

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func TestParseMountinfo(t *testing.T) {
	text := `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 22 43:0 / /var/lib/kubelet/plugins/x/globalmount rw,relatime shared:20 - ext4 /dev/nbd0 rw
36 22 43:0 / /var/lib/kubelet/pods/p/mount ro,relatime shared:20 - ext4 /dev/nbd0 rw
37 22 0:5 /nbd0 /var/lib/kubelet/pods/p/block\040dev rw,nosuid master:2 - devtmpfs udev rw
bad line
`
	ms := parseMountinfo(text)
	if len(ms) != 4 {
		t.Fatalf("%d entries: %+v", len(ms), ms)
	}
	if m := ms[2]; m.Major != 43 || m.Minor != 0 || m.Target != "/var/lib/kubelet/pods/p/mount" || m.FSType != "ext4" ||
		m.Source != "/dev/nbd0" || !hasOpt(m.Options, "ro") {
		t.Fatalf("entry 2: %+v", m)
	}
	if m := ms[3]; m.Target != "/var/lib/kubelet/pods/p/block dev" || m.Root != "/nbd0" {
		t.Fatalf("escapes: %+v", m)
	}
}

func TestDetectFS(t *testing.T) {
	blank := make([]byte, probeBytes)
	if got := detectFS(blank); got != "" {
		t.Fatalf("blank: %q", got)
	}
	ext := make([]byte, probeBytes)
	ext[1080], ext[1081] = 0x53, 0xEF
	if got := detectFS(ext); got != "ext4" {
		t.Fatalf("ext: %q", got)
	}
	xfs := make([]byte, probeBytes)
	copy(xfs, "XFSB")
	if got := detectFS(xfs); got != "xfs" {
		t.Fatalf("xfs: %q", got)
	}
	junk := make([]byte, probeBytes)
	junk[70000] = 1
	if got := detectFS(junk); got != "unknown" {
		t.Fatalf("junk: %q", got)
	}
}

func TestMountFlags(t *testing.T) {
	f, data := mountFlags([]string{"noatime,ro", "discard", "nodev"})
	if f == 0 || data != "discard" {
		t.Fatalf("flags %#x data %q", f, data)
	}
}

func TestDropStalePidFile(t *testing.T) {
	dir := t.TempDir()
	for _, pid := range []string{strconv.Itoa(os.Getpid()), "2147483000", "junk", strconv.Itoa(os.Getppid())} {
		p := filepath.Join(dir, "nbd0.pid")
		if err := os.WriteFile(p, []byte(pid+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		dropStalePidFile(p)
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("pid file naming %s (this process, a dead one, junk, a live non-blockd one) was kept", pid)
		}
	}
}
