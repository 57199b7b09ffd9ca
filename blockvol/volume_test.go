package blockvol

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("BLOCKVOL_VERBOSE") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.DiscardHandler)
}

func newVol(t testing.TB, size, walSize int64) (*Volume, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "vol")
	v, err := Create(dir, Options{Size: size, WALSize: walSize, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { v.Close() })
	return v, dir
}

func pattern(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed*7+1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func mustRead(t testing.TB, v *Volume, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := v.ReadAt(b, off); err != nil {
		t.Fatalf("read off=%d len=%d: %v", off, n, err)
	}
	return b
}

// waitCheckpoint polls until the flusher has checkpointed everything.
func waitCheckpoint(t testing.TB, v *Volume) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for v.CheckpointLSN() < v.HeadLSN() {
		if time.Now().After(deadline) {
			t.Fatalf("checkpoint stuck at %d, head %d", v.CheckpointLSN(), v.HeadLSN())
		}
		v.kick()
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCreateOpenExists(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "v")
	if Exists(dir) {
		t.Fatal("exists before create")
	}
	v, err := Create(dir, Options{Size: 1 << 20, WALSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if !Exists(dir) {
		t.Fatal("not exists after create")
	}
	if _, err := Create(dir, Options{Size: 1 << 20}); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v, want ErrExists", err)
	}
	if v.Size() != 1<<20 || v.BlockSize() != 4096 || v.Role() != "none" || v.Epoch() != 0 {
		t.Fatalf("geometry: size %d bs %d role %q epoch %d", v.Size(), v.BlockSize(), v.Role(), v.Epoch())
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if v.Size() != 1<<20 {
		t.Fatalf("size after reopen %d", v.Size())
	}
}

func TestCreateBadOptions(t *testing.T) {
	for _, o := range []Options{
		{Size: 0},
		{Size: 4097},
		{Size: 1 << 20, BlockSize: 1000},
		{Size: 1 << 20, WALSize: 4096},
		{Size: -4096},
	} {
		dir := filepath.Join(t.TempDir(), "v")
		if v, err := Create(dir, o); err == nil {
			v.Close()
			t.Errorf("create %+v succeeded", o)
		} else if !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("create %+v: %v, want ErrInvalid", o, err)
		}
		if Exists(dir) {
			t.Errorf("create %+v left a volume behind", o)
		}
	}
}

func TestWriteReadRoundTrip(t *testing.T) {
	v, dir := newVol(t, 4<<20, 2<<20)
	want := make([]byte, v.Size())
	write := func(off int64, p []byte) {
		t.Helper()
		if err := v.WriteAt(p, off, false); err != nil {
			t.Fatalf("write off=%d len=%d: %v", off, len(p), err)
		}
		copy(want[off:], p)
	}
	write(0, pattern(1, 4096))
	write(8192, pattern(2, 3*4096))
	write(512, pattern(3, 512))           // sub-block inside a dirty block
	write(20*4096+1024, pattern(4, 5120)) // unaligned start and end, two blocks
	write(100*4096+3584, pattern(5, 1024))
	write(v.Size()-512, pattern(6, 512))
	check := func(stage string) {
		t.Helper()
		got := mustRead(t, v, 0, int(v.Size()))
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: whole-volume read differs", stage)
		}
		for _, r := range [][2]int64{{512, 512}, {1024, 8192}, {20*4096 + 512, 4096}, {v.Size() - 1024, 1024}} {
			if got := mustRead(t, v, r[0], int(r[1])); !bytes.Equal(got, want[r[0]:r[0]+r[1]]) {
				t.Fatalf("%s: read [%d,+%d) differs", stage, r[0], r[1])
			}
		}
	}
	check("dirty")
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	waitCheckpoint(t, v)
	check("flushed to extent")
	write(4096, pattern(7, 8192))
	check("mixed")
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	var err error
	v, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	check("reopened")
}

func TestBadInput(t *testing.T) {
	v, _ := newVol(t, 1<<20, 1<<20)
	buf := make([]byte, 4096)
	cases := []struct {
		name string
		err  error
		fn   func() error
	}{
		{"read past end", blockdev.ErrOutOfRange, func() error { return v.ReadAt(buf, v.Size()) }},
		{"write past end", blockdev.ErrOutOfRange, func() error { return v.WriteAt(buf, v.Size()-512, false) }},
		{"negative offset", blockdev.ErrOutOfRange, func() error { return v.WriteAt(buf, -4096, false) }},
		{"misaligned offset", blockdev.ErrMisaligned, func() error { return v.WriteAt(buf, 100, false) }},
		{"misaligned length", blockdev.ErrMisaligned, func() error { return v.WriteAt(buf[:1000], 0, false) }},
		{"zero length write", blockdev.ErrInvalid, func() error { return v.WriteAt(nil, 0, false) }},
		{"zero length read", blockdev.ErrInvalid, func() error { return v.ReadAt(nil, 0) }},
		{"too large", blockdev.ErrTooLarge, func() error { return v.WriteAt(make([]byte, blockdev.MaxIOSize+4096), 0, false) }},
		{"trim zero", blockdev.ErrInvalid, func() error { return v.Trim(0, 0) }},
		{"trim past end", blockdev.ErrOutOfRange, func() error { return v.Trim(v.Size()-4096, 8192) }},
		{"trim misaligned", blockdev.ErrMisaligned, func() error { return v.Trim(1, 4096) }},
		{"zeroes past end", blockdev.ErrOutOfRange, func() error { return v.WriteZeroes(v.Size(), 4096, true) }},
		{"status past end", blockdev.ErrOutOfRange, func() error { _, err := v.BlockStatus(v.Size(), 4096); return err }},
	}
	for _, c := range cases {
		if err := c.fn(); !errors.Is(err, c.err) {
			t.Errorf("%s: %v, want %v", c.name, err, c.err)
		}
	}
	if v.HeadLSN() != 0 {
		t.Fatalf("bad requests appended records: head LSN %d", v.HeadLSN())
	}
	v.Close()
	for name, fn := range map[string]func() error{
		"read":   func() error { return v.ReadAt(buf, 0) },
		"write":  func() error { return v.WriteAt(buf, 0, false) },
		"flush":  func() error { return v.Flush() },
		"trim":   func() error { return v.Trim(0, 4096) },
		"status": func() error { _, err := v.BlockStatus(0, 4096); return err },
		"apply":  func() error { return v.ApplyRecord(wal.Record{LSN: 1, Type: wal.Barrier}) },
		"epoch":  func() error { return v.SetEpochRole(1, "primary") },
		"drain":  func() error { return v.Drain(func() error { return nil }) },
	} {
		if err := fn(); !errors.Is(err, blockdev.ErrClosed) {
			t.Errorf("%s after close: %v, want ErrClosed", name, err)
		}
	}
	if err := v.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
}

func TestTrimAndBlockStatus(t *testing.T) {
	v, _ := newVol(t, 4<<20, 2<<20)
	data := pattern(9, 1<<20)
	if err := v.WriteAt(data, 0, false); err != nil {
		t.Fatal(err)
	}
	ext, err := v.BlockStatus(0, v.Size())
	if err != nil {
		t.Fatal(err)
	}
	if len(ext) == 0 || ext[0].Hole || ext[0].Length != 1<<20 {
		t.Fatalf("status after write: %+v", ext)
	}
	if err := v.Trim(64<<10, 128<<10); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteZeroes(512<<10, 4096+512, true); err != nil { // partial block at the end
		t.Fatal(err)
	}
	want := append([]byte(nil), data...)
	clear(want[64<<10 : 192<<10])
	clear(want[512<<10 : 512<<10+4096+512])
	if got := mustRead(t, v, 0, 1<<20); !bytes.Equal(got, want) {
		t.Fatal("read after trim differs (dirty)")
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	waitCheckpoint(t, v)
	if got := mustRead(t, v, 0, 1<<20); !bytes.Equal(got, want) {
		t.Fatal("read after trim differs (flushed)")
	}
	ext, err = v.BlockStatus(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	wantExt := []blockdev.Extent{
		{Offset: 0, Length: 64 << 10},
		{Offset: 64 << 10, Length: 128 << 10, Hole: true, Zero: true},
		{Offset: 192 << 10, Length: 320 << 10},
		{Offset: 512 << 10, Length: 4096, Hole: true, Zero: true},
		{Offset: 512<<10 + 4096, Length: 1<<20 - (512<<10 + 4096)},
	}
	if fmt.Sprint(ext) != fmt.Sprint(wantExt) {
		t.Fatalf("status after trim:\n got %+v\nwant %+v", ext, wantExt)
	}
	// Space was given back in the extent file.
	alloc, err := v.extF.Allocated(0, v.Size())
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, r := range alloc {
		n += r.Len
	}
	if n > 1<<20-128<<10 {
		t.Fatalf("extent still has %d bytes allocated after trimming 128 KiB of 1 MiB", n)
	}
	// Dirty overlay: a write into the hole shows as data before it is flushed.
	if err := v.WriteAt(pattern(10, 4096), 64<<10, false); err != nil {
		t.Fatal(err)
	}
	ext, _ = v.BlockStatus(64<<10, 8192)
	if len(ext) != 2 || ext[0].Hole || !ext[1].Hole {
		t.Fatalf("status with dirty block: %+v", ext)
	}
}

func TestEpochRolePersisted(t *testing.T) {
	v, dir := newVol(t, 1<<20, 1<<20)
	if err := v.SetEpochRole(5, "primary"); err != nil {
		t.Fatal(err)
	}
	if err := v.SetEpochRole(4, "replica"); !errors.Is(err, blockdev.ErrInvalid) {
		t.Fatalf("epoch decrease: %v", err)
	}
	if err := v.WriteAt(pattern(1, 4096), 0, true); err != nil {
		t.Fatal(err)
	}
	var got wal.Record
	if err := v.ReadRecords(1, func(r wal.Record) error { got = r; return nil }); err != nil {
		t.Fatal(err)
	}
	if got.Epoch != 5 || got.LSN != 1 {
		t.Fatalf("record epoch %d lsn %d", got.Epoch, got.LSN)
	}
	v.Close()
	v, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if v.Epoch() != 5 || v.Role() != "primary" {
		t.Fatalf("after reopen epoch %d role %q", v.Epoch(), v.Role())
	}
}

func TestWALWrapAround(t *testing.T) {
	v, dir := newVol(t, 2<<20, 1<<20) // 1 MiB WAL, writes of 5 MiB in total
	want := make([]byte, v.Size())
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 1200; i++ {
		nb := 1 + r.IntN(4)
		off := int64(r.IntN(int(v.Size()/4096)-nb)) * 4096
		p := pattern(uint64(i), nb*4096)
		if err := v.WriteAt(p, off, false); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		copy(want[off:], p)
		if i%100 == 0 {
			if got := mustRead(t, v, 0, int(v.Size())); !bytes.Equal(got, want) {
				t.Fatalf("read after %d writes differs", i)
			}
		}
	}
	if v.CheckpointLSN() == 0 {
		t.Fatal("flusher never checkpointed")
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	v.Close()
	v, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if got := mustRead(t, v, 0, int(v.Size())); !bytes.Equal(got, want) {
		t.Fatal("read after reopen differs")
	}
	if v.HeadLSN() < 1200 {
		t.Fatalf("head LSN %d after reopen", v.HeadLSN())
	}
}

func TestConcurrentWritersReaders(t *testing.T) {
	v, _ := newVol(t, 8<<20, 2<<20)
	const writers = 8
	nblocks := int(v.Size() / 4096)
	per := nblocks / writers
	var wg sync.WaitGroup
	errc := make(chan error, writers*2)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 3))
			last := make(map[int]uint64)
			for i := 0; i < 400; i++ {
				b := w*per + r.IntN(per)
				seed := uint64(w)<<32 | uint64(i)
				if err := v.WriteAt(pattern(seed, 4096), int64(b)*4096, r.IntN(20) == 0); err != nil {
					errc <- err
					return
				}
				last[b] = seed
				if r.IntN(10) == 0 {
					if err := v.Flush(); err != nil {
						errc <- err
						return
					}
				}
				// Read back a block this writer owns.
				for bb, s := range last {
					got := make([]byte, 4096)
					if err := v.ReadAt(got, int64(bb)*4096); err != nil {
						errc <- err
						return
					}
					if !bytes.Equal(got, pattern(s, 4096)) {
						errc <- fmt.Errorf("writer %d block %d: stale data", w, bb)
						return
					}
					break
				}
			}
		}(w)
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
}

// Sub-block writes to the same block from many goroutines: every sector
// ends up with the data of one of its writers (the read-modify-write is
// atomic per block).
func TestConcurrentSubBlockWrites(t *testing.T) {
	v, _ := newVol(t, 1<<20, 1<<20)
	var wg sync.WaitGroup
	for s := 0; s < 8; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				p := bytes.Repeat([]byte{byte(s + 1)}, 512)
				if err := v.WriteAt(p, int64(s)*512, false); err != nil {
					t.Error(err)
					return
				}
			}
		}(s)
	}
	wg.Wait()
	got := mustRead(t, v, 0, 4096)
	for s := 0; s < 8; s++ {
		if !bytes.Equal(got[s*512:(s+1)*512], bytes.Repeat([]byte{byte(s + 1)}, 512)) {
			t.Fatalf("sector %d lost its write: % x", s, got[s*512:s*512+8])
		}
	}
}

func TestReplicationHooks(t *testing.T) {
	prim, _ := newVol(t, 2<<20, 1<<20)
	repl, _ := newVol(t, 2<<20, 1<<20)
	feed, err := prim.SubscribeRecords()
	if err != nil {
		t.Fatal(err)
	}
	defer feed.Close()
	if _, err := prim.SubscribeRecords(); !errors.Is(err, ErrFeedBusy) {
		t.Fatalf("second subscriber: %v", err)
	}
	var shipped []wal.Record
	take := func() {
		recs, lost := feed.Take(nil)
		if lost.From != 0 {
			t.Fatalf("feed lost %+v", lost)
		}
		for _, r := range recs {
			r.Payload = append([]byte(nil), r.Payload...)
			shipped = append(shipped, r)
		}
		feed.Recycle(recs)
	}
	prim.HoldRetention("test", 1)
	if err := prim.SetEpochRole(3, "primary"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		if err := prim.WriteAt(pattern(uint64(i), 8192), int64(i%20)*8192, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := prim.Trim(0, 8192); err != nil {
		t.Fatal(err)
	}
	if err := prim.Flush(); err != nil {
		t.Fatal(err)
	}
	waitCheckpoint(t, prim)
	take()
	if prim.OldestRetainedLSN() != 1 {
		t.Fatalf("retention hold ignored: oldest retained %d", prim.OldestRetainedLSN())
	}
	// Sink saw every record in order.
	if len(shipped) != 51 {
		t.Fatalf("sink saw %d records", len(shipped))
	}
	// ReadRecords replays the same records.
	var read []wal.Record
	if err := prim.ReadRecords(1, func(r wal.Record) error {
		r.Payload = append([]byte(nil), r.Payload...)
		read = append(read, r)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(read) != len(shipped) {
		t.Fatalf("ReadRecords gave %d records, sink %d", len(read), len(shipped))
	}
	for i := range read {
		a, b := read[i], shipped[i]
		if a.LSN != uint64(i+1) || a.LSN != b.LSN || a.Epoch != 3 || a.Type != b.Type || a.Offset != b.Offset || !bytes.Equal(a.Payload, b.Payload) {
			t.Fatalf("record %d: read %+v shipped %+v", i, a, b)
		}
	}
	// The replica applies them and ends up identical.
	for _, r := range read {
		if err := repl.ApplyRecord(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := repl.ApplyRecord(read[3]); !errors.Is(err, blockdev.ErrInvalid) {
		t.Fatalf("out-of-order apply: %v", err)
	}
	if repl.HeadLSN() != prim.HeadLSN() {
		t.Fatalf("replica head %d, primary %d", repl.HeadLSN(), prim.HeadLSN())
	}
	if !bytes.Equal(mustRead(t, repl, 0, int(repl.Size())), mustRead(t, prim, 0, int(prim.Size()))) {
		t.Fatal("replica content differs")
	}
	// Releasing the hold lets the tail move; older LSNs are then gone.
	prim.ReleaseRetention("test")
	deadline := time.Now().Add(60 * time.Second)
	for prim.OldestRetainedLSN() <= prim.HeadLSN() {
		if time.Now().After(deadline) {
			t.Fatalf("tail stuck at %d", prim.OldestRetainedLSN())
		}
		prim.kick()
		time.Sleep(5 * time.Millisecond)
	}
	if err := prim.ReadRecords(1, func(wal.Record) error { return nil }); !errors.Is(err, ErrNotRetained) {
		t.Fatalf("ReadRecords of recycled LSNs: %v", err)
	}
}

func TestCorruptSuperblockRefused(t *testing.T) {
	v, dir := newVol(t, 1<<20, 1<<20)
	v.Close()
	p := filepath.Join(dir, SuperblockFile)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[20] ^= 0xff
	b[sbSlotSize+20] ^= 0xff
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("open with corrupt superblock: %v", err)
	}
	// One good slot is enough.
	b[sbSlotSize+20] ^= 0xff
	os.WriteFile(p, b, 0o644)
	v2, err := Open(dir, Options{})
	if err != nil {
		t.Fatalf("open with one good slot: %v", err)
	}
	v2.Close()
}

func TestDrainBlocksIO(t *testing.T) {
	v, _ := newVol(t, 1<<20, 1<<20)
	entered := make(chan struct{})
	release := make(chan struct{})
	go v.Drain(func() error { close(entered); <-release; return nil })
	<-entered
	done := make(chan error)
	go func() { done <- v.WriteAt(make([]byte, 4096), 0, false) }()
	select {
	case err := <-done:
		t.Fatalf("write completed during drain: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// The write path does not allocate in steady state (aligned 4 KiB writes,
// reads of dirty and clean blocks, flushes).
func TestHotPathAllocs(t *testing.T) {
	v, _ := newVol(t, 4<<20, 4<<20)
	buf := make([]byte, 4096)
	off := int64(0)
	step := func() {
		if err := v.WriteAt(buf, off, false); err != nil {
			t.Fatal(err)
		}
		if err := v.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		off = (off + 4096*7) % v.Size()
	}
	for i := 0; i < 100; i++ {
		step()
	}
	v.pauseFlusher.Store(true) // map growth in the flusher is not the hot path
	if n := testing.AllocsPerRun(200, step); n > 0.1 {
		t.Errorf("write+read allocates %.2f times per op", n)
	}
	if n := testing.AllocsPerRun(200, func() {
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
	}); n > 0.1 {
		t.Errorf("flush allocates %.2f times per op", n)
	}
}

// ReadRecords across the ring's end (padding records, short gaps) returns
// every retained record, in order, with the payloads the sink saw.
func TestReadRecordsAcrossWrap(t *testing.T) {
	v, _ := newVol(t, 4<<20, 256<<10)
	seen := map[uint64][]byte{}
	feed, err := v.SubscribeRecords()
	if err != nil {
		t.Fatal(err)
	}
	defer feed.Close()
	var mu sync.Mutex
	take := func() {
		recs, lost := feed.Take(nil)
		if lost.From != 0 {
			t.Fatalf("feed lost %+v", lost)
		}
		mu.Lock()
		for _, r := range recs {
			seen[r.LSN] = append([]byte(nil), r.Payload...)
		}
		mu.Unlock()
		feed.Recycle(recs)
	}
	r := rand.New(rand.NewPCG(7, 7))
	for round := 0; round < 5; round++ {
		v.pauseFlusher.Store(false)
		for i := 0; i < 150; i++ {
			n := 1 + r.IntN(3)
			if err := v.WriteAt(pattern(r.Uint64(), n*4096+512*r.IntN(2)), int64(r.IntN(900))*4096, false); err != nil {
				t.Fatal(err)
			}
		}
		v.pauseFlusher.Store(true)
		for i := 0; i < 10; i++ { // these stay retained
			if err := v.WriteAt(pattern(r.Uint64(), 4096), int64(i)*4096, false); err != nil {
				t.Fatal(err)
			}
		}
		take()
		from := v.OldestRetainedLSN()
		next := from
		err := v.ReadRecords(from, func(rec wal.Record) error {
			if rec.LSN != next {
				return fmt.Errorf("LSN %d, expected %d", rec.LSN, next)
			}
			mu.Lock()
			want := seen[rec.LSN]
			mu.Unlock()
			if !bytes.Equal(rec.Payload, want) {
				return fmt.Errorf("LSN %d payload differs from what the sink saw", rec.LSN)
			}
			next++
			return nil
		})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if next != v.HeadLSN()+1 {
			t.Fatalf("round %d: read up to %d, head %d", round, next-1, v.HeadLSN())
		}
	}
}
