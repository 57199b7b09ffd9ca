package nbdtests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
)

// TestNbdfuseExt4: a real kernel filesystem on blockd without the nbd
// driver: nbdfuse exposes the export as a file, losetup turns it into a
// block device, then mkfs.ext4, mount, write, umount, remount and read,
// umount, e2fsck -fn.
func TestNbdfuseExt4(t *testing.T) {
	for _, tool := range []string{"nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "e2fsck"} {
		testenv.RequireTool(t, tool)
	}
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "losetup and mount need root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Unavailable(t, "/dev/fuse missing: %v", err)
	}
	s := startServer(t)
	dir := t.TempDir()
	fuseDir := filepath.Join(dir, "fuse")
	mnt := filepath.Join(dir, "mnt")
	for _, d := range []string{fuseDir, mnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	pidFile := filepath.Join(dir, "nbdfuse.pid")
	fuse := exec.Command(testenv.RequireTool(t, "nbdfuse"), "-P", pidFile, fuseDir, s.uri())
	var fuseLog bytes.Buffer
	fuse.Stdout, fuse.Stderr = &fuseLog, &fuseLog
	if err := fuse.Start(); err != nil {
		t.Fatal(err)
	}
	fuseDone := make(chan error, 1)
	go func() { fuseDone <- fuse.Wait() }()
	t.Cleanup(func() {
		_, _ = runErr(t, time.Minute, "fusermount3", "-u", fuseDir)
		select {
		case <-fuseDone:
		case <-time.After(30 * time.Second):
			_ = fuse.Process.Kill()
			<-fuseDone
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, err := os.ReadFile(pidFile); err == nil && len(b) > 0 {
			break
		}
		select {
		case err := <-fuseDone:
			testenv.Unavailable(t, "nbdfuse exited before it was ready (%v): %s", err, fuseLog.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse not ready in 30s: %s", fuseLog.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	img := filepath.Join(fuseDir, "nbd")
	if fi, err := os.Stat(img); err != nil || fi.Size() != volSize {
		t.Fatalf("nbdfuse file: %v %v", fi, err)
	}
	out, err := runErr(t, time.Minute, "losetup", "-f", "--show", img)
	if err != nil {
		testenv.Unavailable(t, "no loop device usable here: losetup: %v: %s", err, out)
	}
	loop := strings.TrimSpace(out)
	t.Cleanup(func() { _, _ = runErr(t, time.Minute, "losetup", "-d", loop) })

	run(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", loop)
	if out, err := runErr(t, time.Minute, "mount", loop, mnt); err != nil {
		testenv.Unavailable(t, "mount of ext4 on %s impossible here: %v: %s", loop, err, out)
	}
	mounted := true
	t.Cleanup(func() {
		if mounted {
			_, _ = runErr(t, time.Minute, "umount", "-l", mnt)
		}
	})
	data := bytes.Repeat([]byte("blockd over nbd, through fuse and loop\n"), 200000) // ~7.8 MB
	if err := os.WriteFile(filepath.Join(mnt, "file"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, time.Minute, "sync")
	run(t, time.Minute, "umount", mnt)
	mounted = false
	// Remount: the data comes back through the server.
	run(t, time.Minute, "mount", loop, mnt)
	mounted = true
	got, err := os.ReadFile(filepath.Join(mnt, "file"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("file read back after remount: %d bytes, err %v", len(got), err)
	}
	run(t, time.Minute, "umount", mnt)
	mounted = false
	out = run(t, 2*time.Minute, "e2fsck", "-fn", loop)
	if !strings.Contains(out, "files") {
		t.Fatalf("e2fsck:\n%s", out)
	}
}
