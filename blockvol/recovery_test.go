package blockvol

import (
	"errors"
	"os"
	"testing"

	"github.com/blockd/blockd/vfs"
)

// TestRecoveryRejectsStaleRecordAtTail replays, step by step, the power-cut
// sequence TestPowerCutRandomized once hit at random (seed
// 1796127963255775905, cycle 7405):
//
//  1. Life A writes LSN 2 (block 1) and LSN 3 (block 2) without a flush;
//     the power cut keeps LSN 3 but not LSN 2 (disks reorder unsynced
//     writes).
//  2. Life B recovers up to LSN 1 (LSN 2 does not check out), so block 2
//     reads as zeroes. It writes its own LSN 2, of the same size, at the
//     same position, flushes it and checkpoints it: the tail is now LSN 3,
//     exactly where life A's stale LSN 3 lies. B's own LSN 3 never reaches
//     the disk (a writer that had not issued its pwrite yet).
//  3. Life C scans from the tail and finds life A's LSN 3: the right LSN,
//     an older but not a newer generation. Unless recovery knows that
//     generation B began at LSN 2 (so every record from LSN 2 on must be of
//     generation B), it replays it and block 2 shows a write that life B
//     had discarded.
func TestRecoveryRejectsStaleRecordAtTail(t *testing.T) {
	fs := vfs.NewCrashFS()
	opts := Options{Size: 1 << 20, WALSize: 256 << 10, FS: fs, Logger: testLogger(t)}
	v, err := Create("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	v.pauseFlusher.Store(true)
	base := pattern(1, 4096)
	if err := v.WriteAt(base, 0, true); err != nil { // LSN 1, durable
		t.Fatal(err)
	}
	if err := v.WriteAt(pattern(2, 4096), 4096, false); err != nil { // LSN 2
		t.Fatal(err)
	}
	stale := pattern(3, 4096)
	if err := v.WriteAt(stale, 8192, false); err != nil { // LSN 3
		t.Fatal(err)
	}
	pos2, err := v.posOf(2)
	if err != nil {
		t.Fatal(err)
	}
	fs = fs.PowerCut(vfs.CutOptions{KeepProb: 1})
	v.fail(errors.New("test: power cut"))
	v.Close()
	// The cut lost LSN 2's write: its header never reached the disk.
	dropHeader(t, fs, v.ring.Phys(pos2))

	opts.FS = fs
	v, err = Open("/vol", opts)
	if err != nil {
		t.Fatalf("life B: %v", err)
	}
	if h := v.HeadLSN(); h != 1 {
		t.Fatalf("life B recovered up to LSN %d, want 1 (LSN 2 was lost)", h)
	}
	zero := make([]byte, 4096)
	if got := mustRead(t, v, 8192, 4096); string(got) != string(zero) {
		t.Fatal("life B shows LSN 3, which follows a lost record")
	}
	v.pauseFlusher.Store(true)
	newer := pattern(4, 4096)
	if err := v.WriteAt(newer, 4096, true); err != nil { // LSN 2 of life B
		t.Fatal(err)
	}
	if p, err := v.posOf(2); err != nil || p != pos2 {
		t.Fatalf("life B's LSN 2 at %d (%v), want %d (where life A's was)", p, err, pos2)
	}
	if _, err := v.flushCycle(); err != nil {
		t.Fatal(err)
	}
	if v.CheckpointLSN() != 2 {
		t.Fatalf("checkpoint %d, want 2", v.CheckpointLSN())
	}
	fs = fs.PowerCut(vfs.CutOptions{})
	v.fail(errors.New("test: power cut"))
	v.Close()

	opts.FS = fs
	v, err = Open("/vol", opts)
	if err != nil {
		t.Fatalf("life C: %v", err)
	}
	defer v.Close()
	if got := mustRead(t, v, 8192, 4096); string(got) == string(stale) {
		t.Fatalf("life C replays life A's LSN 3, discarded by life B (head LSN %d)\n%s", v.HeadLSN(), debugDump(v))
	} else if string(got) != string(zero) {
		t.Fatal("block 2 holds neither zeroes nor the stale write")
	}
	if got := mustRead(t, v, 0, 4096); string(got) != string(base) {
		t.Fatal("life C lost block 0")
	}
	if got := mustRead(t, v, 4096, 4096); string(got) != string(newer) {
		t.Fatal("life C lost life B's flushed write to block 1")
	}
	if h := v.HeadLSN(); h != 2 {
		t.Fatalf("life C recovered up to LSN %d, want 2", h)
	}
}

// dropHeader zeroes the record header at phys in the WAL of /vol (a write
// the power cut did not keep) and makes that durable.
func dropHeader(t *testing.T, fs *vfs.CrashFS, phys int64) {
	t.Helper()
	f, err := fs.OpenFile("/vol/"+WALFile, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, 40), phys); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}
