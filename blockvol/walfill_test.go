package blockvol

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/blockd/blockd/vfs"
)

// fillFS is a CrashFS on which the WAL is zero-filled (fillWanted) when
// fill is set, and which counts the writes to files named WALFile. With
// zeroDelay, every all-zero write to the WAL (a fill piece: a record is
// never all zeros) sleeps that long first, so that the fill overlaps the
// writers.
type fillFS struct {
	*vfs.CrashFS
	fill      bool
	zeroDelay time.Duration
	walWrites *atomic.Int64
}

func newFillFS(c *vfs.CrashFS, fill bool) fillFS {
	return fillFS{CrashFS: c, fill: fill, walWrites: new(atomic.Int64)}
}

func (f fillFS) ZeroFillWAL() bool { return f.fill }

func (f fillFS) OpenFile(name string, flag int, perm os.FileMode) (vfs.File, error) {
	file, err := f.CrashFS.OpenFile(name, flag, perm)
	if err != nil || filepath.Base(name) != WALFile {
		return file, err
	}
	return countingFile{File: file, n: f.walWrites, zeroDelay: f.zeroDelay}, nil
}

type countingFile struct {
	vfs.File
	n         *atomic.Int64
	zeroDelay time.Duration
}

func (c countingFile) WriteAt(p []byte, off int64) (int, error) {
	c.n.Add(1)
	if c.zeroDelay > 0 && allZeroBytes(p) {
		time.Sleep(c.zeroDelay)
	}
	return c.File.WriteAt(p, off)
}

func waitFilled(t testing.TB, v *Volume) {
	t.Helper()
	select {
	case <-v.WALFilled():
	case <-time.After(60 * time.Second):
		t.Fatal("WAL fill did not finish in 60 s")
	}
}

// TestWALFillWritesTheWholeWALOnce: Open fills a new WAL in fillChunk
// pieces, marks it filled, and a later Open does not fill it again. An FS
// that does not ask for it (CrashFS) gets no fill.
func TestWALFillWritesTheWholeWALOnce(t *testing.T) {
	const walSize = 1 << 20
	fs := newFillFS(vfs.NewCrashFS(), true)
	opts := Options{Size: 1 << 20, WALSize: walSize, FS: fs, Logger: testLogger(t)}
	v, err := Create("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	waitFilled(t, v)
	if got, want := fs.walWrites.Load(), int64(walSize/fillChunk); got != want {
		t.Errorf("fill wrote the WAL %d times, want %d pieces", got, want)
	}
	if _, err := fs.Stat("/vol/" + WALFilledFile); err != nil {
		t.Errorf("no %s after the fill: %v", WALFilledFile, err)
	}
	buf := make([]byte, walSize)
	if _, err := v.walF.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if !allZeroBytes(buf) {
		t.Error("filled WAL is not all zeros")
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	before := fs.walWrites.Load()
	v, err = Open("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	waitFilled(t, v)
	if got := fs.walWrites.Load(); got != before {
		t.Errorf("reopening a filled WAL wrote it %d more times", got-before)
	}
	v.Close()

	plain := newFillFS(vfs.NewCrashFS(), false)
	opts.FS = plain
	v, err = Create("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	waitFilled(t, v)
	v.Close()
	if n := plain.walWrites.Load(); n != 0 {
		t.Errorf("WAL on an FS without ZeroFillWAL written %d times by the fill", n)
	}
}

// TestWALFillNeverWritesBelowTheHead: a fill piece starts at the head
// when the head is past where the fill stands, so no record is zeroed;
// once the head has left the first lap the fill writes nothing.
func TestWALFillNeverWritesBelowTheHead(t *testing.T) {
	const walSize = 1 << 20
	fs := newFillFS(vfs.NewCrashFS(), false)
	opts := Options{Size: 1 << 20, WALSize: walSize, FS: fs, Logger: testLogger(t)}
	v, err := Create("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	v.pauseFlusher.Store(true)
	data := pattern(3, 5*4096)
	if err := v.WriteAt(data, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	v.appendMu.Lock()
	head := v.head
	v.appendMu.Unlock()
	if head == 0 || head%fillChunk == 0 {
		t.Fatalf("head %d: the test wants it inside the first piece", head)
	}
	logged := make([]byte, head)
	if _, err := v.walF.ReadAt(logged, 0); err != nil {
		t.Fatal(err)
	}
	// The fill stands at 0, behind the head.
	v.ioMu.RLock()
	n, end, err := v.fillPieceLocked(0, walSize)
	v.ioMu.RUnlock()
	if err != nil {
		t.Fatal(err)
	}
	if end != fillChunk || n != int64(fillChunk-head) {
		t.Fatalf("piece wrote %d bytes up to %d; want %d up to %d", n, end, fillChunk-head, fillChunk)
	}
	after := make([]byte, fillChunk)
	if _, err := v.walF.ReadAt(after, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after[:head], logged) {
		t.Fatal("the fill changed the log below the head")
	}
	if !allZeroBytes(after[head:]) {
		t.Fatal("the fill did not zero from the head to the piece's end")
	}
	v.Close()
	if v, err = Open("/vol", opts); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v, 0, len(data)); !bytes.Equal(got, data) {
		t.Fatal("data lost after a fill piece and a reopen")
	}
	v.Close()

	// Past the first lap: nothing to fill.
	if v, err = Open("/vol", opts); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		v.appendMu.Lock()
		head := v.head
		v.appendMu.Unlock()
		if head >= walSize {
			break
		}
		if err := v.WriteAt(pattern(uint64(i), 64<<10), int64(i%16)*(64<<10), false); err != nil {
			t.Fatal(err)
		}
	}
	writes := fs.walWrites.Load()
	v.ioMu.RLock()
	n, end, err = v.fillPieceLocked(0, walSize)
	v.ioMu.RUnlock()
	if err != nil || n != 0 || end != walSize || fs.walWrites.Load() != writes {
		t.Fatalf("fill after the first lap: %d bytes, end %d, %d writes, err %v; want nothing",
			n, end, fs.walWrites.Load()-writes, err)
	}
	v.Close()
}

// TestPowerCutWALFill: the power-cut cycles of TestPowerCutRandomized on
// volumes whose WAL is being zero-filled while the writers run: the cut
// comes early, mostly in the middle of the fill, and a reopened volume
// fills again from its recovered head, over whatever tail the cut left.
// Every block must read back as a version the completed flushes allow. A
// fresh volume is created whenever the fill of the current one is done.
func TestPowerCutWALFill(t *testing.T) {
	cycles := cyclesWanted() / 4
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BLOCKVOL_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (BLOCKVOL_CRASH_SEED), %d cycles", seed, cycles)
	r := rand.New(rand.NewPCG(seed, 43))
	const nblocks = 64
	const writers = 4
	var fs fillFS
	var m *crashModel
	var v *Volume
	var err error
	opts := Options{Size: nblocks * 4096, WALSize: 2 << 20, Logger: testLogger(t), WALFullTimeout: 200 * time.Millisecond}
	slow := func(f fillFS) fillFS {
		f.zeroDelay = 200 * time.Microsecond
		return f
	}
	fresh := func() {
		fs = slow(newFillFS(vfs.NewCrashFS(), true))
		opts.FS = fs
		if v, err = Create("/vol", opts); err != nil {
			t.Fatal(err)
		}
		m = &crashModel{blocks: make([]blockModel, nblocks)}
		for b := range m.blocks {
			m.blocks[b].history = []version{{}}
		}
	}
	fresh()
	creates, midFill := 1, 0
	for c := 0; c < cycles; c++ {
		var wg sync.WaitGroup
		per := nblocks / writers
		opsPer := 5 + r.IntN(60)
		uniform := r.IntN(3) == 0
		for w := 0; w < writers; w++ {
			wg.Add(1)
			wr := rand.New(rand.NewPCG(r.Uint64(), uint64(w)))
			go func(w int) {
				defer wg.Done()
				crashWriter(v, m, w*per, (w+1)*per, wr, opsPer, uniform)
			}(w)
		}
		cut := randomCut(r)
		waitOps(fs, fs.Ops()+int64(r.IntN(40)), &wg, 10*time.Microsecond)
		select {
		case <-v.WALFilled():
		default:
			midFill++
		}
		cutFS := fs.PowerCut(cut)
		v.fail(errors.New("test: power cut"))
		wg.Wait()
		v.Close()
		fs = slow(newFillFS(cutFS, true))
		opts.FS = fs
		if v, err = Open("/vol", opts); err != nil {
			t.Fatalf("cycle %d: recovery failed (cut %+v): %v", c, cut, err)
		}
		if err := m.verify(v, nblocks); err != nil {
			t.Log(debugDump(v))
			t.Fatalf("cycle %d (cut keep=%v tear=%v): %v", c, cut.KeepProb, cut.Tear, err)
		}
		if _, err := fs.Stat("/vol/" + WALFilledFile); err == nil {
			v.Close()
			fresh()
			creates++
		}
	}
	v.Close()
	t.Logf("%d cycles, %d cut in the middle of a fill, %d volumes created", cycles, midFill, creates)
	if midFill == 0 {
		t.Fatal("no power cut came in the middle of a fill: the test did not test the fill")
	}
}

// TestWALFillRealFile: on the real file system the fill leaves no
// unwritten extent in the WAL (FIEMAP), and writes that race it from the
// first moment read back intact after a reopen.
func TestWALFillRealFile(t *testing.T) {
	const walSize = 8 << 20
	const nblocks = 256
	dir := filepath.Join(t.TempDir(), "vol")
	opts := Options{Size: nblocks * 4096, WALSize: walSize, Logger: testLogger(t)}
	v, err := Create(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	want := make([][]byte, nblocks)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				b := w*(nblocks/4) + i%(nblocks/4)
				d := pattern(uint64(w<<20|i), 4096)
				if err := v.WriteAt(d, int64(b)*4096, false); err != nil {
					t.Error(err)
					return
				}
				want[b] = d
				if i%16 == 0 {
					if err := v.Flush(); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	waitFilled(t, v)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, WALFilledFile)); err != nil {
		t.Errorf("no %s after the fill: %v", WALFilledFile, err)
	}
	if v, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	for b, d := range want {
		if d != nil && !bytes.Equal(mustRead(t, v, int64(b)*4096, 4096), d) {
			t.Fatalf("block %d lost or changed", b)
		}
	}
	unwritten, err := unwrittenBytes(filepath.Join(dir, WALFile), walSize)
	if err != nil {
		t.Skipf("cannot tell unwritten extents on this file system (%v)", err)
	}
	if unwritten != 0 {
		t.Fatalf("%d bytes of the WAL are still unwritten extents after the fill", unwritten)
	}
}

// unwrittenBytes sums the FIEMAP extents of [0, length) of path flagged
// FIEMAP_EXTENT_UNWRITTEN (fallocated, never written).
func unwrittenBytes(path string, length int64) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	const (
		fsIocFiemap      = 0xC020660B // _IOWR('f', 11, struct fiemap)
		fiemapFlagSync   = 0x1
		fiemapExtentLast = 0x1
		fiemapUnwritten  = 0x800
		nExt             = 64
	)
	type extent struct {
		Logical, Physical, Length uint64
		_                         [2]uint64
		Flags                     uint32
		_                         [3]uint32
	}
	type fiemap struct {
		Start, Length                     uint64
		Flags, Mapped, ExtentCount, Rsrvd uint32
		Ext                               [nExt]extent
	}
	var total int64
	start := uint64(0)
	for start < uint64(length) {
		fm := fiemap{Start: start, Length: uint64(length) - start, Flags: fiemapFlagSync, ExtentCount: nExt}
		if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&fm))); e != 0 {
			return 0, e
		}
		if fm.Mapped == 0 {
			break
		}
		last := false
		for _, x := range fm.Ext[:fm.Mapped] {
			if x.Flags&fiemapUnwritten != 0 {
				total += int64(x.Length)
			}
			start = x.Logical + x.Length
			last = last || x.Flags&fiemapExtentLast != 0
		}
		if last {
			break
		}
	}
	return total, nil
}

func allZeroBytes(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
