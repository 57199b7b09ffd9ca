package blockvol

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

const (
	tpOld = 1 << 20
	tpNew = 4 << 20
)

// Prepare grows the extent but not the volume: writes past the committed
// size are still refused; commit exposes the new size; both survive reopen.
func TestExpandPrepareCommit(t *testing.T) {
	v, dir := newVol(t, tpOld, 256<<10)
	last := pattern(1, 4096)
	if err := v.WriteAt(last, tpOld-4096, true); err != nil {
		t.Fatal(err)
	}
	if err := v.PrepareExpand(tpNew, 7); err != nil {
		t.Fatalf("prepare: %v", err)
	}
	if err := v.PrepareExpand(tpNew, 7); err != nil {
		t.Fatalf("repeated prepare: %v", err)
	}
	if v.Size() != tpOld {
		t.Fatalf("prepare exposed the size: %d", v.Size())
	}
	if p, id := v.PendingExpand(); p != tpNew || id != 7 {
		t.Fatalf("pending %d id %d", p, id)
	}
	if err := v.WriteAt(last, tpOld, false); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Fatalf("write past the committed size while prepared: %v", err)
	}
	// Prepared survives a reopen, still unexposed.
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if p, id := v.PendingExpand(); v.Size() != tpOld || p != tpNew || id != 7 {
		t.Fatalf("after reopen: size %d pending %d id %d", v.Size(), p, id)
	}
	if err := v.CommitExpand(2 << 20); !errors.Is(err, ErrNoPendingExpand) {
		t.Fatalf("commit of another size: %v", err)
	}
	if err := v.CommitExpand(tpNew); err != nil {
		t.Fatalf("commit: %v", err)
	}
	if err := v.CommitExpand(tpNew); err != nil {
		t.Fatalf("repeated commit: %v", err)
	}
	if p, _ := v.PendingExpand(); v.Size() != tpNew || p != 0 {
		t.Fatalf("after commit: size %d pending %d", v.Size(), p)
	}
	grown := pattern(2, 8192)
	if err := v.WriteAt(grown, 3<<20, true); err != nil {
		t.Fatalf("write in the new range: %v", err)
	}
	if got := mustRead(t, v, tpOld-4096, 4096); !bytes.Equal(got, last) {
		t.Fatal("data before the old end changed")
	}
}

// Cancel drops the pending size and gives the extent back; a later prepare
// of another size replaces a pending one.
func TestExpandPrepareCancel(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: tpOld, WALSize: 256 << 10, FS: fs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.PrepareExpand(tpNew, 1); err != nil {
		t.Fatal(err)
	}
	if n := extentLen(t, fs); n != tpNew {
		t.Fatalf("extent %d after prepare", n)
	}
	if err := v.PrepareExpand(2<<20, 2); err != nil {
		t.Fatalf("replace the pending expand: %v", err)
	}
	if p, id := v.PendingExpand(); p != 2<<20 || id != 2 || extentLen(t, fs) != 2<<20 {
		t.Fatalf("after replace: pending %d id %d extent %d", p, id, extentLen(t, fs))
	}
	if err := v.CancelExpand(); err != nil {
		t.Fatal(err)
	}
	if err := v.CancelExpand(); err != nil {
		t.Fatalf("repeated cancel: %v", err)
	}
	if p, _ := v.PendingExpand(); v.Size() != tpOld || p != 0 || extentLen(t, fs) != tpOld {
		t.Fatalf("after cancel: size %d pending %d extent %d", v.Size(), p, extentLen(t, fs))
	}
	for _, c := range []struct {
		size int64
		want error
	}{{512 << 10, blockdev.ErrInvalid}, {tpOld, blockdev.ErrInvalid}, {tpNew + 512, blockdev.ErrMisaligned}} {
		if err := v.PrepareExpand(c.size, 3); !errors.Is(err, c.want) {
			t.Errorf("prepare %d: %v, want %v", c.size, err, c.want)
		}
	}
	if p, _ := v.PendingExpand(); p != 0 || v.Size() != tpOld {
		t.Fatalf("a refused prepare changed something: pending %d size %d", p, v.Size())
	}
}

// A prepare that cannot grow the extent (full disk) fails with a clear
// error and changes nothing.
func TestExpandPrepareNoSpace(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: tpOld, WALSize: 256 << 10, FS: fs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	fs.Inject(vfs.Fault{Op: vfs.OpTruncate, Name: ExtentFile, Err: errNoSpace, Count: 1})
	err = v.PrepareExpand(tpNew, 1)
	if !errors.Is(err, blockdev.ErrNoSpace) {
		t.Fatalf("prepare on a full disk: %v", err)
	}
	if p, _ := v.PendingExpand(); p != 0 || v.Size() != tpOld {
		t.Fatalf("failed prepare left pending %d size %d", p, v.Size())
	}
}

func extentLen(t *testing.T, fs *vfs.CrashFS) int64 {
	t.Helper()
	f, err := fs.OpenFile("/vol/"+ExtentFile, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// The power goes at every file operation of prepare+commit and of
// prepare+cancel. After the reboot the volume is at one consistent size:
// the old one (with or without the pending size, which commit or cancel
// then resolves) or, once the commit's superblock write was durable, the
// new one; data below the old end is intact; the extent is as long as the
// sizes the superblock names.
func TestExpandPowerCutAtEveryStep(t *testing.T) {
	for _, end := range []string{"commit", "cancel"} {
		for _, keep := range []float64{0, 0.5} {
			t.Run(fmt.Sprintf("%s/keep%.1f", end, keep), func(t *testing.T) {
				for n := int64(0); ; n++ {
					if expandCutAt(t, end, keep, n) {
						t.Logf("%d cut points", n)
						if n < 3 {
							t.Fatalf("the sequence finished after %d operations: the cut points test nothing", n)
						}
						return
					}
				}
			})
		}
	}
}

// expandCutAt runs one power cut after n operations; it reports whether the
// whole sequence finished before the cut.
func expandCutAt(t *testing.T, end string, keep float64, n int64) bool {
	t.Helper()
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: tpOld, WALSize: 256 << 10, FS: fs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	last := pattern(uint64(n)+1, 4096)
	if err := v.WriteAt(last, tpOld-4096, true); err != nil {
		t.Fatal(err)
	}
	waitCheckpoint(t, v)
	v.pauseFlusher.Store(true)
	fs.CutAfter(n)
	step := "none"
	err = v.PrepareExpand(tpNew, 9)
	if err == nil {
		step = "prepared"
		if end == "commit" {
			err = v.CommitExpand(tpNew)
		} else {
			err = v.CancelExpand()
		}
		if err == nil {
			step = end
		}
	}
	finished := step == end
	fs2 := fs.PowerCut(vfs.CutOptions{KeepProb: keep, Tear: keep > 0, Rand: rand.New(rand.NewPCG(uint64(n), 3))})
	v.fail(errors.New("test: power cut"))
	v.Close()

	v2, err := Open("/vol", Options{FS: fs2, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("cut after %d ops (reached %s): open: %v", n, step, err)
	}
	defer v2.Close()
	size := v2.Size()
	pend, id := v2.PendingExpand()
	what := fmt.Sprintf("cut after %d ops (reached %s): size %d pending %d id %d", n, step, size, pend, id)
	switch {
	case size != tpOld && size != tpNew:
		t.Fatalf("%s: size is neither old nor new", what)
	case size == tpNew && end == "cancel":
		t.Fatalf("%s: a cancelled expand exposed the new size", what)
	case size == tpNew && step != "commit" && step != "prepared":
		t.Fatalf("%s: the new size without a prepare", what)
	case finished && end == "commit" && size != tpNew:
		t.Fatalf("%s: a committed expand lost", what)
	case finished && end == "cancel" && pend != 0:
		t.Fatalf("%s: a cancelled expand still pending", what)
	case pend != 0 && (pend != tpNew || id != 9 || size != tpOld):
		t.Fatalf("%s: inconsistent pending expand", what)
	case step == "commit" && pend == 0 && size != tpNew:
		t.Fatalf("%s: committed but neither new nor pending", what)
	}
	if got := mustRead(t, v2, tpOld-4096, 4096); !bytes.Equal(got, last) {
		t.Fatalf("%s: data before the old end changed", what)
	}
	if el := extentLen(t, fs2); el != max(size, pend) {
		t.Fatalf("%s: extent is %d bytes", what, el)
	}
	// The master's word resolves a pending size: both outcomes work.
	if pend != 0 {
		if end == "commit" {
			err = v2.CommitExpand(tpNew)
		} else {
			err = v2.CancelExpand()
		}
		if err != nil {
			t.Fatalf("%s: resolve after reboot: %v", what, err)
		}
	}
	if err := v2.WriteAt(last, tpOld, true); (err == nil) != (v2.Size() == tpNew) {
		t.Fatalf("%s: write past the old end with size %d: %v", what, v2.Size(), err)
	}
	return finished
}

// A prepared replica accepts records past its size (the primary committed
// first and writes there), replays them after a crash that came before its
// own commit, and serves them once it commits. An unprepared one refuses.
func TestExpandPreparedReplicaAcceptsRecords(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: tpOld, WALSize: 256 << 10, FS: fs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	rec := wal.Record{LSN: 1, Epoch: 1, Type: wal.Write, Offset: 3 << 20, Length: 4096, Payload: pattern(5, 4096)}
	if err := v.ApplyRecord(rec); !errors.Is(err, blockdev.ErrInvalid) {
		t.Fatalf("record past the size before prepare: %v", err)
	}
	if err := v.PrepareExpand(tpNew, 4); err != nil {
		t.Fatal(err)
	}
	v.pauseFlusher.Store(true) // the record stays in the WAL only
	if err := v.ApplyRecord(rec); err != nil {
		t.Fatalf("record past the size while prepared: %v", err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	fs2 := fs.PowerCut(vfs.CutOptions{})
	v.fail(errors.New("test: power cut"))
	v.Close()
	v2, err := Open("/vol", Options{FS: fs2, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("reopen with a record past the size in the WAL: %v", err)
	}
	defer v2.Close()
	if v2.HeadLSN() != 1 || v2.Size() != tpOld {
		t.Fatalf("after reopen: head %d size %d", v2.HeadLSN(), v2.Size())
	}
	if err := v2.CommitExpand(tpNew); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v2, 3<<20, 4096); !bytes.Equal(got, rec.Payload) {
		t.Fatal("the record past the old size was lost")
	}
}
