package imagetests

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestExportToFullDisk: the output is on a 1 MiB tmpfs. The export of a
// live volume fails naming the full disk, the partial file is removed and
// the temporary snapshot is deleted on the server.
func TestExportToFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	s := startServe(t, "64MiB")
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = syscall.Unmount(mnt, syscall.MNT_DETACH) })
	s.mustQemuIO("vol0", "write -P 0x5a 0 4M")
	s.cliFails("no space left on device", "volume", "export", "vol0", "--output", filepath.Join(mnt, "vol0.img"))
	if m, _ := filepath.Glob(filepath.Join(mnt, "*")); len(m) != 0 {
		t.Fatalf("partial output left: %v", m)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		l := s.mustCLI("snapshot", "list", "vol0")
		if !strings.Contains(l, "export-") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the temporary export snapshot outlived the failed export:\n%s", l)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// A snapshot export to stdout into a full pipe reader is the same
	// path; a later export to a roomy place works.
	s.mustCLI("volume", "export", "vol0", "--output", filepath.Join(t.TempDir(), "ok.img"))
}

// TestImportAndCloneOnFullDisk: the server's writes of the staging file
// fail with ENOSPC (BLOCKD_VFS_FAULTS). Import and clone fail naming the
// full disk; the target reads as before; the clone's new volume is gone.
func TestImportAndCloneOnFullDisk(t *testing.T) {
	s := startServe(t, "64MiB", "BLOCKD_VFS_FAULTS=write:import-staging.img:enospc,after=2")
	dir := t.TempDir()
	s.mustQemuIO("vol0", "write -P 0x5a 0 4M")
	s.mustCLI("snapshot", "create", "vol0", "s1")
	img := filepath.Join(dir, "s1.img")
	s.mustCLI("volume", "export", "vol0@s1", "--output", img)
	s.mustCLI("volume", "create", "vol1", "--size", "64MiB", "--rf", "1")
	s.waitVolume("vol1")
	s.mustQemuIO("vol1", "write -P 0x99 5M 1M")
	s.capture("vol1", filepath.Join(dir, "vol1.before"))
	s.cliFails("no space left on device", "volume", "import", "vol1", "--input", img, "--force")
	s.sameAs("vol1", filepath.Join(dir, "vol1.before"))
	msg := s.cliFails("no space left on device", "volume", "clone", "vol0@s1", "vol2")
	if !strings.Contains(msg, "vol2 was deleted") {
		t.Fatalf("clone failure does not say the new volume was removed: %s", msg)
	}
	if l := s.mustCLI("volume", "list"); strings.Contains(l, "vol2") {
		t.Fatalf("the failed clone left vol2:\n%s", l)
	}
}

// TestInterruptedImportRolledBack: a crash in the middle of an import
// leaves the pending snapshot and the IMPORT-PENDING marker (made here by
// hand: a pending snapshot, writes after it, the marker, a stale staging
// file). The next start restores the pending snapshot, so the volume
// reads as before the import, and removes the snapshot, marker and file.
func TestInterruptedImportRolledBack(t *testing.T) {
	s := startServe(t, "64MiB")
	dir := t.TempDir()
	s.mustQemuIO("vol0", "write -P 0x5a 0 2M")
	s.mustCLI("snapshot", "create", "vol0", "import-pending-crash")
	s.capture("vol0", filepath.Join(dir, "before.raw"))
	s.mustQemuIO("vol0", "write -P 0xee 1M 2M", "write -z 0 64k") // the import's half-done writes
	s.stop()
	vdir := filepath.Join(s.dataDir, "server", "volumes", "vol0")
	if _, err := os.Stat(vdir); err != nil {
		t.Fatalf("volume directory: %v", err)
	}
	mark := fmt.Sprintf(`{"pending":"import-pending-crash","started":%q}`, time.Now().UTC().Format(time.RFC3339))
	if err := os.WriteFile(filepath.Join(vdir, "IMPORT-PENDING"), []byte(mark), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(vdir, "import-staging.img"), []byte("half an image"), 0o644); err != nil {
		t.Fatal(err)
	}
	s.start("64MiB")
	s.sameAs("vol0", filepath.Join(dir, "before.raw"))
	if l := s.mustCLI("snapshot", "list", "vol0"); strings.Contains(l, "import-pending") {
		t.Fatalf("pending snapshot left after the rollback:\n%s", l)
	}
	for _, f := range []string{"IMPORT-PENDING", "import-staging.img"} {
		if _, err := os.Stat(filepath.Join(vdir, f)); err == nil {
			t.Fatalf("%s left after the rollback", f)
		}
	}
	if !strings.Contains(s.log.String(), "import_rolled_back") {
		t.Fatal("no import_rolled_back event in the log")
	}
	// A marker whose pending snapshot is gone: the import had committed
	// (the deletion is the commit), so only the marker goes.
	s.mustQemuIO("vol0", "write -P 0x77 4M 1M")
	s.capture("vol0", filepath.Join(dir, "committed.raw"))
	s.stop()
	mark = `{"pending":"import-pending-gone"}`
	if err := os.WriteFile(filepath.Join(vdir, "IMPORT-PENDING"), []byte(mark), 0o644); err != nil {
		t.Fatal(err)
	}
	s.start("64MiB")
	s.sameAs("vol0", filepath.Join(dir, "committed.raw"))
	if _, err := os.Stat(filepath.Join(vdir, "IMPORT-PENDING")); err == nil {
		t.Fatal("the marker of a committed import was left")
	}
}

// TestOrphanPendingImportRolledBack: a pending import snapshot without a
// marker is what a new primary finds when the old one died mid-import (the
// snapshot is replicated, the marker is not). The next import on the
// primary rolls it back first: the volume reads as at the pending
// snapshot and the snapshots taken after it are gone.
func TestOrphanPendingImportRolledBack(t *testing.T) {
	s := startServe(t, "64MiB")
	dir := t.TempDir()
	s.mustQemuIO("vol0", "write -P 0x5a 0 2M")
	s.mustCLI("snapshot", "create", "vol0", "keep")
	s.mustCLI("snapshot", "create", "vol0", "import-pending-orphan")
	s.capture("vol0", filepath.Join(dir, "before.raw"))
	s.mustQemuIO("vol0", "write -P 0xee 1M 2M")
	s.mustCLI("snapshot", "create", "vol0", "made-by-import")
	if err := os.WriteFile(filepath.Join(dir, "junk.img"), []byte("not an image at all"), 0o644); err != nil {
		t.Fatal(err)
	}
	s.cliFails("not a blockd image", "volume", "import", "vol0", "--input", filepath.Join(dir, "junk.img"))
	s.sameAs("vol0", filepath.Join(dir, "before.raw"))
	l := s.mustCLI("snapshot", "list", "vol0")
	if strings.Contains(l, "import-pending") || strings.Contains(l, "made-by-import") || !strings.Contains(l, "keep") {
		t.Fatalf("after the rollback the snapshots are:\n%s\nwant only keep", l)
	}
}

// TestKilledImportRolledBack: kill -9 of blockd serve in the middle of an
// import's apply (every WAL write is slowed by 30 ms, so the 32 records
// take over a second; the kill comes 200 ms after import_started). After
// the restart the volume reads as before the import (empty) and holds no
// snapshot: the interrupted import was rolled back.
func TestKilledImportRolledBack(t *testing.T) {
	src := startServe(t, "64MiB")
	dir := t.TempDir()
	src.mustQemuIO("vol0", "write -P 0x5a 0 32M")
	src.mustCLI("snapshot", "create", "vol0", "s1")
	img := filepath.Join(dir, "s1.img")
	src.mustCLI("volume", "export", "vol0@s1", "--output", img)
	src.stop()

	s := startServe(t, "64MiB", "BLOCKD_VFS_FAULTS=write:wal:delay,latency=30ms")
	s.capture("vol0", filepath.Join(dir, "before.raw"))
	done := make(chan error, 1)
	go func() { _, err := s.cli("volume", "import", "vol0", "--input", img); done <- err }()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(s.log.String(), "import_started") {
		select {
		case err := <-done:
			t.Fatalf("the import ended before it started applying: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no import_started in 60 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("the import finished before the kill (%v): the WAL delay did not slow it", err)
	default:
	}
	_ = s.cmd.Process.Kill()
	<-s.exited
	if err := <-done; err == nil {
		t.Fatal("the import reported success though its server was killed")
	}
	s.env = nil
	s.start("64MiB")
	s.sameAs("vol0", filepath.Join(dir, "before.raw"))
	if l := s.mustCLI("snapshot", "list", "vol0"); !strings.Contains(l, "no snapshots") {
		t.Fatalf("snapshots after the rollback:\n%s", l)
	}
	if l := s.log.String(); !strings.Contains(l, "import_interrupted") || !strings.Contains(l, "import_rolled_back") {
		t.Fatal("no import_interrupted / import_rolled_back events after the restart")
	}
	// The import then works.
	s.mustCLI("volume", "import", "vol0", "--input", img)
	decodeTo(t, img, filepath.Join(dir, "s1.raw"))
	s.sameAs("vol0", filepath.Join(dir, "s1.raw"))
}
