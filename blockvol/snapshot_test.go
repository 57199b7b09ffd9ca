package blockvol

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/vfs"
)

// snapModel is the expected content of a volume and its snapshots.
type snapModel struct {
	live  []byte
	snaps map[string][]byte
}

func newSnapModel(size int64) *snapModel {
	return &snapModel{live: make([]byte, size), snaps: map[string][]byte{}}
}

func (m *snapModel) write(t testing.TB, v *Volume, p []byte, off int64) {
	t.Helper()
	if err := v.WriteAt(p, off, false); err != nil {
		t.Fatalf("write off=%d: %v", off, err)
	}
	copy(m.live[off:], p)
}

func (m *snapModel) trim(t testing.TB, v *Volume, off, n int64) {
	t.Helper()
	if err := v.Trim(off, n); err != nil {
		t.Fatalf("trim off=%d: %v", off, err)
	}
	clear(m.live[off : off+n])
}

func (m *snapModel) create(t testing.TB, v *Volume, name string) SnapshotInfo {
	t.Helper()
	in, err := v.CreateSnapshot(name, SnapshotOptions{})
	if err != nil {
		t.Fatalf("create snapshot %q: %v", name, err)
	}
	m.snaps[name] = bytes.Clone(m.live)
	return in
}

func (m *snapModel) check(t testing.TB, v *Volume) {
	t.Helper()
	if got := mustRead(t, v, 0, len(m.live)); !bytes.Equal(got, m.live) {
		t.Fatalf("live content differs at byte %d", firstDiff(got, m.live))
	}
	names := map[string]bool{}
	for _, in := range v.Snapshots() {
		names[in.Name] = true
	}
	for name, want := range m.snaps {
		if !names[name] {
			t.Fatalf("snapshot %q missing", name)
		}
		got := readSnapshot(t, v, name)
		if !bytes.Equal(got, want) {
			t.Fatalf("snapshot %q differs at byte %d", name, firstDiff(got, want))
		}
	}
	if len(names) != len(m.snaps) {
		t.Fatalf("volume has snapshots %v, model %d", names, len(m.snaps))
	}
}

func readSnapshot(t testing.TB, v *Volume, name string) []byte {
	t.Helper()
	r, err := v.OpenSnapshot(name)
	if err != nil {
		t.Fatalf("open snapshot %q: %v", name, err)
	}
	defer r.Close()
	b := make([]byte, r.Size())
	for off := int64(0); off < int64(len(b)); off += 1 << 20 {
		end := min(off+1<<20, int64(len(b)))
		if err := r.ReadAt(b[off:end], off); err != nil {
			t.Fatalf("read snapshot %q at %d: %v", name, off, err)
		}
	}
	return b
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func flushAll(t testing.TB, v *Volume) {
	t.Helper()
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	waitCheckpoint(t, v)
}

func TestSnapshotBasic(t *testing.T) {
	v, dir := newVol(t, 1<<20, 256<<10)
	m := newSnapModel(v.Size())
	m.write(t, v, pattern(1, 64<<10), 0)
	s1 := m.create(t, v, "s1")
	if s1.ID != 1 || s1.LSN == 0 || s1.SizeBytes != v.Size() || checkUUID(s1.UUID) != nil {
		t.Fatalf("info %+v", s1)
	}
	m.write(t, v, pattern(2, 8192), 4096)    // overwrite inside s1's data
	m.write(t, v, pattern(3, 8192), 512<<10) // over a hole
	m.trim(t, v, 32<<10, 16<<10)
	m.write(t, v, pattern(4, 1024), 100<<10+512) // sub-block
	m.check(t, v)                                // from the WAL
	flushAll(t, v)
	m.check(t, v) // after copy-on-write
	m.create(t, v, "s2")
	m.write(t, v, pattern(5, 4096), 4096)
	m.trim(t, v, 0, 1<<20)
	flushAll(t, v)
	m.check(t, v)
	if n := len(v.Snapshots()); n != 2 {
		t.Fatalf("%d snapshots", n)
	}
	// Reopen: the indexes come back from the files.
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	m.check(t, v2)
	// Restore s1: the live volume reads as s1; s1 and s2 stay.
	if err := v2.RestoreSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	copy(m.live, m.snaps["s1"])
	m.check(t, v2)
	m.write(t, v2, pattern(6, 4096), 8192)
	flushAll(t, v2)
	m.check(t, v2)
	// Delete s1 (the older one) and s2.
	if err := v2.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	delete(m.snaps, "s1")
	m.check(t, v2)
	if err := v2.DeleteSnapshot("s2"); err != nil {
		t.Fatal(err)
	}
	delete(m.snaps, "s2")
	m.check(t, v2)
	if s3 := m.create(t, v2, "s3"); s3.ID != 3 {
		t.Fatalf("IDs are reused: %+v", s3)
	}
}

// Deleting a middle or the newest snapshot moves what the older one
// needs into it.
func TestSnapshotDeleteMerges(t *testing.T) {
	for _, victim := range []string{"b", "c"} {
		t.Run(victim, func(t *testing.T) {
			v, _ := newVol(t, 1<<20, 256<<10)
			m := newSnapModel(v.Size())
			r := rand.New(rand.NewPCG(9, 9))
			for i, name := range []string{"a", "b", "c"} {
				for k := 0; k < 20; k++ {
					m.write(t, v, pattern(uint64(i*100+k), 4096), int64(r.IntN(256))*4096)
				}
				flushAll(t, v)
				m.create(t, v, name)
			}
			for k := 0; k < 40; k++ {
				m.write(t, v, pattern(uint64(1000+k), 4096), int64(r.IntN(256))*4096)
			}
			flushAll(t, v)
			m.check(t, v)
			if err := v.DeleteSnapshot(victim); err != nil {
				t.Fatal(err)
			}
			delete(m.snaps, victim)
			m.check(t, v)
		})
	}
}

func TestSnapshotBadInput(t *testing.T) {
	v, _ := newVol(t, 1<<20, 256<<10)
	for _, name := range []string{"", "a@b", "a/b", "-x", string(make([]byte, 65))} {
		if _, err := v.CreateSnapshot(name, SnapshotOptions{}); !errors.Is(err, ErrSnapshotName) {
			t.Errorf("create %q: %v", name, err)
		}
	}
	if _, err := v.CreateSnapshot("ok", SnapshotOptions{UUID: "not-a-uuid"}); !errors.Is(err, blockdev.ErrInvalid) {
		t.Errorf("bad UUID: %v", err)
	}
	if _, err := v.CreateSnapshot("s", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot("s", SnapshotOptions{}); !errors.Is(err, ErrSnapshotExists) {
		t.Errorf("duplicate: %v", err)
	}
	for _, fn := range []func() error{
		func() error { return v.DeleteSnapshot("nope") },
		func() error { return v.RestoreSnapshot("nope") },
		func() error { _, err := v.OpenSnapshot("nope"); return err },
		func() error { _, err := v.SnapshotInfo("nope"); return err },
		func() error { _, err := v.ChangedRanges("nope", ""); return err },
		func() error { _, err := v.ChangedRanges("s", "nope"); return err },
	} {
		if err := fn(); !errors.Is(err, ErrSnapshotNotFound) {
			t.Errorf("unknown snapshot: %v", err)
		}
	}
	r, err := v.OpenSnapshot("s")
	if err != nil {
		t.Fatal(err)
	}
	if err := v.DeleteSnapshot("s"); !errors.Is(err, ErrSnapshotBusy) {
		t.Errorf("delete while open: %v", err)
	}
	if err := r.WriteAt(make([]byte, 4096), 0, false); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Errorf("write to a snapshot: %v", err)
	}
	if err := r.Trim(0, 4096); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Errorf("trim of a snapshot: %v", err)
	}
	if err := r.ReadAt(make([]byte, 4096), v.Size()); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Errorf("read past the end: %v", err)
	}
	r.Close()
	if err := r.ReadAt(make([]byte, 4096), 0); !errors.Is(err, blockdev.ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
	if err := v.DeleteSnapshot("s"); err != nil {
		t.Errorf("delete after close: %v", err)
	}
	if n := len(v.Snapshots()); n != 0 {
		t.Errorf("%d snapshots left", n)
	}
}

func TestSnapshotChangedRanges(t *testing.T) {
	v, _ := newVol(t, 1<<20, 256<<10)
	if err := v.WriteAt(pattern(1, 1<<20), 0, false); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot("a", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(v.WriteAt(pattern(2, 8192), 16384, false))
	flushAll(t, v)
	must(v.WriteAt(pattern(3, 4096), 65536, false))
	_, err := v.CreateSnapshot("b", SnapshotOptions{})
	must(err)
	must(v.Trim(128<<10, 8192)) // unflushed
	str := func(rs []Range) string { return fmt.Sprint(rs) }
	got, err := v.ChangedRanges("a", "b")
	must(err)
	if want := []Range{{16384, 8192}, {65536, 4096}}; str(got) != str(want) {
		t.Errorf("a..b: %v, want %v", got, want)
	}
	got, err = v.ChangedRanges("a", "")
	must(err)
	if want := []Range{{16384, 8192}, {65536, 4096}, {128 << 10, 8192}}; str(got) != str(want) {
		t.Errorf("a..live: %v, want %v", got, want)
	}
	got, err = v.ChangedRanges("b", "")
	must(err)
	if want := []Range{{128 << 10, 8192}}; str(got) != str(want) {
		t.Errorf("b..live: %v, want %v", got, want)
	}
	if _, err := v.ChangedRanges("b", "a"); !errors.Is(err, blockdev.ErrInvalid) {
		t.Errorf("b..a: %v", err)
	}
}

// A full disk at any step before the commit point fails the create with
// a clear error and leaves no snapshot (in memory or after a reopen).
func TestSnapshotCreateFullDisk(t *testing.T) {
	for _, path := range []string{"snap-*.cow", SnapshotMetaFile + ".tmp"} {
		t.Run(path, func(t *testing.T) {
			efs := vfs.NewErrorFS(vfs.NewCrashFS(), 1)
			v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 256 << 10, FS: efs, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			if err := v.WriteAt(pattern(1, 8192), 0, false); err != nil {
				t.Fatal(err)
			}
			id := efs.AddRule(vfs.Rule{Ops: []vfs.Op{vfs.OpWrite}, Path: path, Err: errNoSpace})
			_, err = v.CreateSnapshot("s", SnapshotOptions{})
			if !errors.Is(err, blockdev.ErrNoSpace) {
				t.Fatalf("create on a full disk: %v", err)
			}
			efs.RemoveRule(id)
			if n := len(v.Snapshots()); n != 0 {
				t.Fatalf("%d snapshots after a failed create", n)
			}
			if _, err := efs.Stat("/vol/" + SnapshotFile(1)); err == nil {
				t.Fatal("failed create left its snapshot file")
			}
			if _, err := v.CreateSnapshot("s", SnapshotOptions{}); err != nil {
				t.Fatalf("create after space came back: %v", err)
			}
			v.Close()
			v2, err := Open("/vol", Options{FS: efs, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			defer v2.Close()
			if s := v2.Snapshots(); len(s) != 1 || s[0].Name != "s" {
				t.Fatalf("after reopen: %+v", s)
			}
		})
	}
}

// A create whose record is durable but whose metadata commit failed is
// activated by recovery at the record's point; a delete likewise is
// completed. Without the recovery step the snapshot would be missing on
// this volume while a replica that got the record has it.
func TestSnapshotRecoveryCompletesOperations(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 256 << 10, FS: fs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	m := newSnapModel(v.Size())
	m.write(t, v, pattern(1, 64<<10), 0)
	m.create(t, v, "a")
	m.write(t, v, pattern(2, 32<<10), 16<<10)
	fs.Inject(vfs.Fault{Op: vfs.OpRename, Name: SnapshotMetaFile + ".tmp", Err: errEIO, Count: 1})
	if _, err := v.CreateSnapshot("b", SnapshotOptions{}); err == nil {
		t.Fatal("create succeeded despite the failed metadata commit")
	}
	m.snaps["b"] = bytes.Clone(m.live)
	fs = fs.PowerCut(vfs.CutOptions{})
	v.Close()
	h := &captureHandler{}
	v, err = Open("/vol", Options{FS: fs, Logger: slog.New(h)})
	if err != nil {
		t.Fatal(err)
	}
	if ev := h.find("engine_snapshot_activated_on_recovery"); ev == nil || ev["snapshot"] != "b" {
		t.Fatalf("no activation event: %v", h.events)
	}
	m.check(t, v)
	m.write(t, v, pattern(3, 64<<10), 0)
	flushAll(t, v)
	m.check(t, v)
	// Delete b (it holds blocks a lacks) with the commit failing.
	fs.Inject(vfs.Fault{Op: vfs.OpRename, Name: SnapshotMetaFile + ".tmp", Err: errEIO, Count: 1})
	if err := v.DeleteSnapshot("b"); err == nil {
		t.Fatal("delete succeeded despite the failed metadata commit")
	}
	delete(m.snaps, "b")
	fs = fs.PowerCut(vfs.CutOptions{})
	v.Close()
	h = &captureHandler{}
	v, err = Open("/vol", Options{FS: fs, Logger: slog.New(h)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if ev := h.find("engine_snapshot_delete_completed_on_recovery"); ev == nil || ev["snapshot"] != "b" {
		t.Fatalf("no delete completion event: %v", h.events)
	}
	m.check(t, v)
	if _, err := fs.Stat("/vol/" + SnapshotFile(2)); err == nil {
		t.Fatal("deleted snapshot's file is still there")
	}
}

// A snapshot holds every write acknowledged before CreateSnapshot was
// called, with writers running concurrently; create, delete and restore
// racing each other are serialised (no deadlock, no unexpected error) and
// leave every snapshot readable and the restored base intact.
func TestSnapshotConcurrentOperations(t *testing.T) {
	const nblocks = 32
	v, _ := newVol(t, nblocks*4096, 256<<10)
	// Block b holds a counter written by writer b%4: counter c of block b
	// is the sector pattern with tag c.
	blockData := func(b int, c uint32) []byte {
		p := make([]byte, 4096)
		for s := 0; s < spb; s++ {
			fillSector(p[s*512:], c, uint64(b), s)
		}
		return p
	}
	readCounters := func(p []byte) ([]uint32, error) {
		out := make([]uint32, nblocks)
		for b := 0; b < nblocks; b++ {
			tag, err := decodeSector(p[b*4096:], uint64(b), 0)
			if err != nil {
				return nil, err
			}
			for s := 1; s < spb; s++ {
				if t2, err := decodeSector(p[b*4096+s*512:], uint64(b), s); err != nil || t2 != tag {
					return nil, fmt.Errorf("block %d torn: sector %d tag %d, sector 0 tag %d (%v)", b, s, t2, tag, err)
				}
			}
			out[b] = tag
		}
		return out, nil
	}
	if _, err := v.CreateSnapshot("base", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	var acked [nblocks]atomic.Uint32
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for c := uint32(1); ; c++ {
				select {
				case <-stop:
					return
				default:
				}
				for b := w; b < nblocks; b += 4 {
					if err := v.WriteAt(blockData(b, c), int64(b)*4096, false); err != nil {
						errc <- err
						return
					}
					acked[b].Store(c)
				}
			}
		}(w)
	}
	// Creates check the acknowledged-before rule; a second goroutine
	// deletes and restores meanwhile.
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(3, 4))
		for i := 0; i < 60; i++ {
			switch rng.IntN(3) {
			case 0:
				if err := v.RestoreSnapshot("base"); err != nil {
					errc <- err
					return
				}
			default:
				// Not found (not created yet) and busy (the checker is
				// reading it) are the answers a racing delete may get.
				err := v.DeleteSnapshot(fmt.Sprintf("c%d", rng.IntN(20)))
				if err != nil && !errors.Is(err, ErrSnapshotNotFound) && !errors.Is(err, ErrSnapshotBusy) {
					errc <- err
					return
				}
			}
		}
	}()
	for i := 0; i < 40; i++ {
		var before [nblocks]uint32
		for b := range before {
			before[b] = acked[b].Load()
		}
		name := fmt.Sprintf("c%d", i%20)
		if err := v.DeleteSnapshot(name); err != nil && !errors.Is(err, ErrSnapshotNotFound) {
			t.Fatalf("delete %q: %v", name, err)
		}
		if _, err := v.CreateSnapshot(name, SnapshotOptions{}); err != nil {
			t.Fatalf("create %q: %v", name, err)
		}
		r, err := v.OpenSnapshot(name)
		if err != nil {
			if errors.Is(err, ErrSnapshotNotFound) {
				continue // deleted by the other goroutine meanwhile
			}
			t.Fatal(err)
		}
		p := make([]byte, nblocks*4096)
		err = r.ReadAt(p, 0)
		r.Close()
		if err != nil {
			t.Fatal(err)
		}
		got, err := readCounters(p)
		if err != nil {
			t.Fatalf("snapshot %q: %v", name, err)
		}
		for b := range got {
			// A restore of base (all zeroes) may run before the create;
			// writes acknowledged before the call are otherwise in it.
			if got[b] < before[b] && got[b] != 0 {
				t.Fatalf("snapshot %q block %d has counter %d; %d was acknowledged before the create", name, b, got[b], before[b])
			}
		}
	}
	close(stop)
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if got := readSnapshot(t, v, "base"); !allZero(got) {
		t.Fatal("base changed")
	}
	for _, in := range v.Snapshots() {
		if _, err := readCounters(readSnapshot(t, v, in.Name)); err != nil {
			t.Fatalf("snapshot %q: %v", in.Name, err)
		}
	}
}

// A snapshot is created with the flusher stopped, and only the flusher
// frees log space: when a retention hold keeps the log full, the create
// waits for room before it stops the flusher, so the hold's release lets
// it through (it used to wait out the WAL-full timeout and fail).
func TestSnapshotCreateWaitsForLogSpace(t *testing.T) {
	v, _ := newVol(t, 8<<20, 256<<10)
	v.fullTO = 3 * time.Second
	v.HoldRetention("test", v.HeadLSN()+1)
	// Fill the log with 4 KiB writes, then to the last few bytes with
	// trims (40-byte records), so the snapshot record does not fit.
	buf := make([]byte, 4096)
	free := func() int64 { st := v.Stats(); return st.WALSizeBytes - st.WALUsedBytes }
	for i := 0; free() > 4136+200; i++ {
		if err := v.WriteAt(buf, int64(i%2000)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; free() >= 100; i++ {
		if err := v.Trim(int64(i%2000)*4096, 4096); err != nil {
			t.Fatal(err)
		}
	}
	go func() {
		time.Sleep(500 * time.Millisecond)
		v.ReleaseRetention("test")
	}()
	t0 := time.Now()
	if _, err := v.CreateSnapshot("s1", SnapshotOptions{}); err != nil {
		t.Fatalf("create with the log full until the hold goes: %v (after %v)", err, time.Since(t0))
	}
	t.Logf("created %v after the hold was set", time.Since(t0))
}
