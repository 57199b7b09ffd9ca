package blockvol

import (
	"bytes"
	"errors"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

func fillPattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/4096)
	}
	return b
}

// A large aligned write goes around the WAL: one small record, the data
// once in a data file; reads, a reopen, a small write and a trim into
// its chunk, block status and the checkpoint all see the same bytes, and
// the old slot's space is given back.
func TestRedirectBasics(t *testing.T) {
	v, dir := newVol(t, 8<<20, 4<<20)
	big := fillPattern(1<<20, 1)
	if err := v.WriteAt(big, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	st := v.Stats()
	if st.RedirectWrites != 1 || st.RedirectBytes != 1<<20 {
		t.Fatalf("stats after one 1 MiB write: %+v", st)
	}
	if st.RedirectDirectBytes != 0 {
		t.Fatalf("direct bytes without Options.DirectIO: %d", st.RedirectDirectBytes)
	}
	// The WAL holds a record of tens of bytes, not a MiB.
	if used := st.WALUsedBytes; used > 4096 {
		t.Fatalf("WAL holds %d bytes after a redirected write", used)
	}
	got := make([]byte, 1<<20)
	if err := v.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, big))
	}
	// A small write into the redirected chunk settles the redirect first.
	small := fillPattern(4096, 9)
	if err := v.WriteAt(small, 1<<20+8192, false); err != nil {
		t.Fatal(err)
	}
	if v.Stats().RedirectSettles != 1 {
		t.Fatalf("settles: %d, want 1", v.Stats().RedirectSettles)
	}
	copy(big[8192:], small)
	if err := v.Trim(1<<20+512<<10, 64<<10); err != nil {
		t.Fatal(err)
	}
	clear(big[512<<10 : 576<<10])
	check := func(what string) {
		t.Helper()
		if err := v.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, big) {
			t.Fatalf("%s: %v, equal %v", what, err, bytes.Equal(got, big))
		}
		ext, err := v.BlockStatus(1<<20, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		var holes int64
		for _, e := range ext {
			if e.Hole {
				holes += e.Length
			}
		}
		if holes != 64<<10 {
			t.Fatalf("%s: block status %v: %d bytes of holes, want 64 KiB", what, ext, holes)
		}
	}
	check("before the checkpoint")
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	check("after the checkpoint")
	if v.slots.npending.Load() != 0 {
		t.Fatalf("%d redirects pending after a checkpoint", v.slots.npending.Load())
	}
	// One copy of the data on disk.
	if total := allocated(t, v, 8<<20); total > 1<<20 {
		t.Fatalf("%d bytes allocated in extent+shadow for 1 MiB written", total)
	}
	v.Close()
	v, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	check("after reopen")
	// Unaligned writes take the WAL, and so do writes larger than one
	// record of this WAL may carry (a quarter of it): a replica with the
	// same WAL takes the write as one Write record.
	if err := v.WriteAt(fillPattern(1<<20, 3), 1<<20+4096, false); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(fillPattern(2<<20, 4), 4<<20, false); err != nil {
		t.Fatal(err)
	}
	if n := v.Stats().RedirectWrites; n != 0 {
		t.Fatalf("%d unaligned or too large writes were redirected", n)
	}
}

// Replication reads a redirected write back as the Write it stands for;
// once a later write overwrote its data in place, reading it says so
// (ErrNotRetained), so the replica gets a full transfer instead of wrong
// bytes.
func TestRedirectReadRecords(t *testing.T) {
	v, _ := newVol(t, 8<<20, 4<<20)
	v.pauseFlusher.Store(true) // the records stay in the log, unsynced
	first := fillPattern(256<<10, 5)
	if err := v.WriteAt(first, 0, false); err != nil {
		t.Fatal(err)
	}
	lsn := v.HeadLSN()
	var got []wal.Record
	if err := v.ReadRecords(lsn, func(r wal.Record) error {
		r.Payload = append([]byte(nil), r.Payload...)
		got = append(got, r)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Type != wal.Write || got[0].Offset != 0 || !bytes.Equal(got[0].Payload, first) {
		t.Fatalf("read back %d records (first type %v)", len(got), got[0].Type)
	}
	// Not durable yet: the next write of the same chunks goes in place.
	if err := v.WriteAt(fillPattern(256<<10, 6), 0, false); err != nil {
		t.Fatal(err)
	}
	err := v.ReadRecords(lsn, func(wal.Record) error { return nil })
	if !errors.Is(err, ErrNotRetained) || !strings.Contains(err.Error(), "overwritten since") {
		t.Fatalf("reading an overwritten redirect: %v, want ErrNotRetained", err)
	}
	t.Logf("refusal: %v", err)
	// A replica never takes a Redirect record itself.
	rec := wal.Record{LSN: v.HeadLSN() + 1, Type: wal.Redirect, Offset: 0, Length: 32, Payload: make([]byte, 32)}
	if err := v.ValidateRecord(rec); err == nil {
		t.Fatal("a replica accepted a redirect record")
	}
}

// Readers racing large writes (flips, in-place overwrites), small writes
// into the same chunks, flushes and the flusher's checkpoints and punches
// always read whole blocks: every block they read is one write's block
// (or zeroes), never a mix and never a punched hole under a live slot.
func TestRedirectConcurrentReads(t *testing.T) {
	const size = 4 << 20
	v, _ := newVol(t, size, 1<<20)
	var stop atomic.Bool
	var wg sync.WaitGroup
	var tag atomic.Uint32
	errc := make(chan error, 8)
	fill := func(buf []byte, first uint64) {
		tg := tag.Add(1)
		for b := 0; b < len(buf)/4096; b++ {
			for s := 0; s < spb; s++ {
				fillSector(buf[b*4096+s*512:], tg, first+uint64(b), s)
			}
		}
	}
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 3))
			buf := make([]byte, 512<<10)
			for i := 0; !stop.Load(); i++ {
				// Writer 0: large writes over the first 512 KiB, rarely
				// flushed, so most overwrite the last one in place.
				// Writer 1: a mix over the whole volume.
				var off int64
				var n int
				switch {
				case w == 0:
					n = (2 + r.IntN(7)) * (64 << 10)
					off = r.Int64N(int64(8-n/(64<<10))+1) * (64 << 10)
				case r.IntN(4) == 0:
					n = 4096 * (1 + r.IntN(3))
					off = r.Int64N(size/4096-4) * 4096
				default:
					n = (2 + r.IntN(7)) * (64 << 10)
					off = r.Int64N(size/(64<<10)-8) * (64 << 10)
				}
				fill(buf[:n], uint64(off/4096))
				if err := v.WriteAt(buf[:n], off, w == 1 && i%5 == 0); err != nil {
					errc <- err
					return
				}
				if w == 1 {
					time.Sleep(2 * time.Millisecond) // leave writer 0 unflushed stretches
				}
				if (w == 0 && i%50 == 49) || (w == 1 && i%7 == 0) {
					if err := v.Flush(); err != nil {
						errc <- err
						return
					}
				}
			}
		}(w)
	}
	for rd := 0; rd < 2; rd++ {
		wg.Add(1)
		go func(rd int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(rd), 9))
			buf := make([]byte, 256<<10)
			for !stop.Load() {
				n := 4096 * (1 + r.IntN(64))
				off := r.Int64N(size/4096-64) * 4096
				if rd == 0 {
					off = r.Int64N(64) * 4096 // where writer 0 overwrites
				}
				if err := v.ReadAt(buf[:n], off); err != nil {
					errc <- err
					return
				}
				for b := 0; b < n/4096; b++ {
					blk := uint64(off/4096) + uint64(b)
					var first uint32
					for s := 0; s < spb; s++ {
						tg, err := decodeSector(buf[b*4096+s*512:], blk, s)
						if err != nil {
							errc <- err
							return
						}
						if s == 0 {
							first = tg
						} else if tg != first {
							errc <- fmt.Errorf("block %d mixes writes %d and %d", blk, first, tg)
							return
						}
					}
				}
			}
		}(rd)
	}
	time.Sleep(3 * time.Second)
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-errc:
		t.Fatal(err)
	default:
	}
	st := v.Stats()
	if st.RedirectWrites == 0 {
		t.Fatal("no large write was redirected")
	}
	t.Logf("%d writes, %d redirected, %d settles", tag.Load(), st.RedirectWrites, st.RedirectSettles)
}

// allocated is the space extent and shadow take in [0, size).
func allocated(t *testing.T, v *Volume, size int64) int64 {
	t.Helper()
	var total int64
	for _, f := range []vfs.File{v.extF, v.shF} {
		rs, err := f.Allocated(0, size)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			total += r.Len
		}
	}
	return total
}

// waitAllocated waits (up to a generous deadline: the flusher's idle tick
// does the work) until extent and shadow take at most want bytes.
func waitAllocated(t *testing.T, v *Volume, size, want int64, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := allocated(t, v, size)
		if got <= want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d bytes allocated, want at most %d", what, got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A chunk rewritten by large writes flips between its slots; the slot it
// left is not punched at the checkpoint (a flip back into a punched slot
// makes the filesystem allocate again) but once the volume is idle, at
// Close, and, after a crash, once the reopened volume is idle.
func TestRedirectOldSlotsPunchedWhenIdle(t *testing.T) {
	const size = 8 << 20
	v, dir := newVol(t, size, 4<<20)
	v.pauseFlusher.Store(true) // the test checkpoints; no idle tick either
	var writeAt func(v *Volume, seed byte, off int64)
	write := func(v *Volume, seed byte) { writeAt(v, seed, 1<<20) }
	writeAt = func(v *Volume, seed byte, off int64) {
		t.Helper()
		if err := v.WriteAt(fillPattern(1<<20, seed), off, false); err != nil {
			t.Fatal(err)
		}
		if err := v.ReplCheckpoint(); err != nil {
			t.Fatal(err)
		}
	}
	write(v, 1) // into the shadow (slot 1): the extent's slot is the durable one
	write(v, 2) // back into the extent
	if got := allocated(t, v, size); got != 2<<20 {
		t.Fatalf("after a flip and a checkpoint: %d bytes allocated, want both slots (2 MiB): the old slot waits for an idle volume", got)
	}
	v.pauseFlusher.Store(false)
	waitAllocated(t, v, size, 1<<20, "idle volume")

	// A stop before the idle tick: Close gives the space back. Chunk A
	// (at 1 MiB) ends in slot 1 with its old data in the extent, chunk B
	// (at 4 MiB) in slot 0 with its old data in the shadow.
	v.pauseFlusher.Store(true)
	write(v, 3)
	writeAt(v, 4, 4<<20)
	writeAt(v, 5, 4<<20)
	if got := allocated(t, v, size); got != 4<<20 {
		t.Fatalf("after more flips: %d bytes allocated, want 4 MiB", got)
	}
	// What a crash leaves: a copy of the files as they are now.
	crashed := filepath.Join(t.TempDir(), "crashed")
	copyDirSparse(t, dir, crashed)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	v.pauseFlusher.Store(true)
	if got := allocated(t, v, size); got != 2<<20 {
		t.Fatalf("after Close: %d bytes allocated, want 2 MiB", got)
	}
	v.Close()

	// After the crash the reopened volume finds the old slot and punches
	// it once idle; the data reads back.
	v, err = Open(crashed, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	waitAllocated(t, v, size, 2<<20, "reopened after a crash")
	got := make([]byte, 1<<20)
	for _, c := range []struct {
		off  int64
		seed byte
	}{{1 << 20, 3}, {4 << 20, 5}} {
		if err := v.ReadAt(got, c.off); err != nil || !bytes.Equal(got, fillPattern(1<<20, c.seed)) {
			t.Fatalf("read back at %d after the crash: %v, equal %v", c.off, err, bytes.Equal(got, fillPattern(1<<20, c.seed)))
		}
	}
}

// copyDirSparse copies the regular files of src into a new dst, holes
// kept as holes (what a SIGKILL leaves on disk: the page cache is the
// file's content).
func copyDirSparse(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		in, err := vfs.Default.OpenFile(filepath.Join(src, e.Name()), os.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out, err := vfs.Default.OpenFile(filepath.Join(dst, e.Name()), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		if err := out.Truncate(fi.Size()); err != nil {
			t.Fatal(err)
		}
		rs, err := in.Allocated(0, fi.Size())
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			buf := make([]byte, r.Len)
			if _, err := in.ReadAt(buf, r.Off); err != nil {
				t.Fatal(err)
			}
			if _, err := out.WriteAt(buf, r.Off); err != nil {
				t.Fatal(err)
			}
		}
		in.Close()
		out.Close()
	}
}

// Past its bound (a quarter of the volume) the backlog gives back its
// newest entries first, down to three quarters of the bound.
func TestPunchBacklogBound(t *testing.T) {
	s := &slotState{cshift: 16}
	const size = 64 << 20 // 1024 chunks: the bound is 256
	for c := uint64(0); c < 256; c++ {
		s.queuePunchLocked(c)
		s.queuePunchLocked(c) // once only
	}
	if n := s.overBoundLocked(size); n != 0 {
		t.Fatalf("at the bound: %d to punch", n)
	}
	s.queuePunchLocked(1000)
	got := s.takePunchLocked(s.overBoundLocked(size))
	if len(got) != 257-192 || got[len(got)-1] != 1000 || got[0] != 256-(257-192)+1 {
		t.Fatalf("over the bound: took %d chunks %v..., want the newest 65", len(got), got[:3])
	}
	inSet := 0
	for _, w := range s.queued {
		inSet += bits.OnesCount64(w)
	}
	if len(s.punch) != 192 || inSet != 192 {
		t.Fatalf("left %d queued (%d in the set), want 192", len(s.punch), inSet)
	}
}

// With Options.DirectIO, on a real filesystem and with an aligned buffer,
// a large write's data goes around the page cache (vfs.DirectWriter) and
// reads back, before and after a reopen; an unaligned buffer takes the
// page cache.
func TestRedirectDirectIO(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vol")
	v, err := Create(dir, Options{Size: 8 << 20, WALSize: 4 << 20, Logger: testLogger(t), DirectIO: true})
	if err != nil {
		t.Fatal(err)
	}
	big := fillPattern(1<<20, 1) // a large allocation: page aligned
	if err := v.WriteAt(big, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	odd := make([]byte, 1<<20+512)[512:] // not aligned in memory
	copy(odd, fillPattern(1<<20, 2))
	if err := v.WriteAt(odd, 4<<20, true); err != nil {
		t.Fatal(err)
	}
	st := v.Stats()
	if st.RedirectWrites != 2 || st.RedirectDirectBytes != 1<<20 {
		t.Fatalf("after an aligned and an unaligned 1 MiB write: %d redirects, %d direct bytes; want 2 and 1 MiB (of %s)", st.RedirectWrites, st.RedirectDirectBytes, dir)
	}
	check := func(what string) {
		t.Helper()
		got := make([]byte, 1<<20)
		for _, c := range []struct {
			off  int64
			want []byte
		}{{1 << 20, big}, {4 << 20, odd}} {
			if err := v.ReadAt(got, c.off); err != nil || !bytes.Equal(got, c.want) {
				t.Fatalf("%s: read at %d: %v, equal %v", what, c.off, err, bytes.Equal(got, c.want))
			}
		}
	}
	check("before a reopen")
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if v, err = Open(dir, Options{Logger: testLogger(t)}); err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	check("after a reopen")
}

// TestRewritesDoNotCallForCheckpoint: large writes that rewrite the same
// chunks, never flushed, do not call for a checkpoint (which would
// fdatasync the data files) until the chunks they cover pass the limit;
// the old rule, half the WAL counted per write, called for one after two
// of them. A checkpoint then clears the pending count, and the last
// version reads back after a reopen.
func TestRewritesDoNotCallForCheckpoint(t *testing.T) {
	v, dir := newVol(t, 8<<20, 4<<20)
	v.pauseFlusher.Store(true)
	for i := 0; i < 64; i++ {
		if err := v.WriteAt(fillPattern(1<<20, byte(i)), 1<<20, false); err != nil {
			t.Fatal(err)
		}
	}
	s := &v.slots
	if n, b := s.pendChunks.Load(), s.pendBytes.Load(); n != 16 || b != 64<<20 {
		t.Fatalf("pending: %d chunks, %d bytes; want 16 chunks (1 MiB) and 64 MiB of writes", n, b)
	}
	if v.redirectsDue() {
		t.Fatalf("64 rewrites of one MiB call for a checkpoint: half the WAL is %d bytes, the chunks hold 1 MiB", flushHighWater(v.walSize))
	}
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if n, b := s.pendChunks.Load(), s.pendBytes.Load(); n != 0 || b != 0 {
		t.Fatalf("after a checkpoint: %d chunks, %d bytes pending", n, b)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	got := make([]byte, 1<<20)
	if err := v.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, fillPattern(1<<20, 63)) {
		t.Fatal("the last rewrite did not read back after a reopen")
	}
}
