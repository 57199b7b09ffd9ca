package blockvol

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/vfs"
)

// The punch backlog holds old slots' space back (up to a quarter of the
// volume); a large write that finds the disk full must get that space
// back rather than fail the volume. A 64 MiB volume on a 74 MiB tmpfs
// (its 2 MiB WAL and 8 MiB to spare), four passes of 256 KiB overwrites
// over all of it: without the retry the first pass fails with ENOSPC
// once the backlog passes the spare 8 MiB (its bound is 16). Chunks whose
// redirects are not checkpointed yet hold both slots: the spare covers
// them (half the WAL, more while the flusher lags), and the retry waits
// for the checkpoint that frees them.
func TestRedirectDiskFullPunchesBacklog(t *testing.T) {
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=74m"); err != nil {
		testenv.Unavailable(t, "mount a 74 MiB tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, 0) })
	const size = 64 << 20
	v, err := Create(filepath.Join(dir, "vol"), Options{Size: size, WALSize: 2 << 20, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	buf := make([]byte, 256<<10)
	for pass := 0; pass < 4; pass++ {
		for off := int64(0); off < size; off += 256 << 10 {
			for i := range buf {
				buf[i] = byte(pass*7 + int(off>>18) + i%251 + 1)
			}
			if err := v.WriteAt(buf, off, false); err != nil {
				v.slots.mu.Lock()
				backlog, pending := len(v.slots.punch), len(v.slots.pending)
				v.slots.mu.Unlock()
				t.Fatalf("pass %d at %d: %v (extent+shadow hold %d MiB for a %d MiB volume; %d chunks on the punch backlog, %d with pending redirects (%d bytes); checkpoint LSN %d, head %d)",
					pass, off, err, allocated(t, v, size)>>20, size>>20, backlog, pending, v.slots.pendBytes.Load(), v.ckptLSN.Load(), v.headLSN.Load())
			}
		}
	}
	if st := v.Stats(); st.RedirectWrites == 0 {
		t.Fatal("no write took the redirect path: the test tests nothing")
	}
	got := make([]byte, len(buf))
	for off := int64(0); off < size; off += 256 << 10 {
		if err := v.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		for i := range got {
			if got[i] != byte(3*7+int(off>>18)+i%251+1) {
				t.Fatalf("byte %d at %d after the last pass: %d", i, off, got[i])
			}
		}
	}
}

// Drain promises a paused flusher, and Expand replaces the slot bits
// inside it (growSlots): the flusher's punches of the backlog must not
// run inside a Drain. With -race this also catches the punch reading the
// bits growSlots replaces.
func TestPunchesWaitForDrain(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.NewCrashFS(), 1)
	v, err := Create("/vol", Options{Size: 64 << 20, WALSize: 4 << 20, FS: efs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	v.pauseFlusher.Store(true)
	// 512 idle chunks on the backlog, as a checkpoint or Open's scan
	// leaves them.
	v.slots.mu.Lock()
	for c := uint64(0); c < 512; c++ {
		v.slots.queuePunchLocked(c)
	}
	v.slots.mu.Unlock()
	efs.AddRule(vfs.Rule{Ops: []vfs.Op{vfs.OpPunch}, Path: ShadowFile, Latency: 2 * time.Millisecond})
	v.pauseFlusher.Store(false)
	if err := testenv.WaitUntil(20*time.Second, func() error {
		if efs.Delayed() == 0 {
			return errors.New("no punch yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	var during int64
	size := int64(64 << 20)
	err = v.Drain(func() error {
		d0 := efs.Delayed()
		for i := 0; i < 4; i++ {
			size += 8 << 20
			v.growSlots(size) // what Expand does inside Drain
			time.Sleep(10 * time.Millisecond)
		}
		during = efs.Delayed() - d0
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if during > 0 {
		t.Fatalf("%d punches started inside Drain", during)
	}
	// The same through the public API.
	for i := 0; i < 4; i++ {
		size += 8 << 20
		if err := v.Expand(size); err != nil {
			t.Fatal(err)
		}
	}
}
