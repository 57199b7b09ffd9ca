package blockvol

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

var crashCycles = flag.Int("crash.cycles", 0, "power-cut cycles for TestPowerCutRandomized (0: $BLOCKVOL_CRASH_CYCLES or 1000)")

func cyclesWanted() int {
	if *crashCycles > 0 {
		return *crashCycles
	}
	if s := os.Getenv("BLOCKVOL_CRASH_CYCLES"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			return n
		}
	}
	if testing.Short() {
		return 200
	}
	return 1000
}

// Sector content: a tag (unique per write, 0 = zeroes), the block and the
// sector, then bytes derived from all three, so any sector read back
// names the write it came from and a mix of two writes inside a sector
// (or data written to the wrong place) is detected.
func fillSector(dst []byte, tag uint32, block uint64, sector int) {
	if tag == 0 {
		clear(dst[:512])
		return
	}
	binary.LittleEndian.PutUint32(dst[0:], tag)
	binary.LittleEndian.PutUint32(dst[4:], uint32(block))
	binary.LittleEndian.PutUint32(dst[8:], uint32(sector))
	x := uint64(tag)<<32 ^ block<<8 ^ uint64(sector) ^ 0x9e3779b97f4a7c15
	for i := 12; i < 512; i += 4 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint32(dst[i:], uint32(x))
	}
}

// decodeSector returns the tag of a sector or an error if it is not
// exactly what fillSector wrote for this block and sector.
func decodeSector(src []byte, block uint64, sector int) (uint32, error) {
	tag := binary.LittleEndian.Uint32(src)
	if tag == 0 {
		for _, c := range src[:512] {
			if c != 0 {
				return 0, fmt.Errorf("block %d sector %d: garbage (zero tag, non-zero bytes)", block, sector)
			}
		}
		return 0, nil
	}
	var want [512]byte
	fillSector(want[:], tag, block, sector)
	if string(want[:]) != string(src[:512]) {
		return 0, fmt.Errorf("block %d sector %d: content does not match tag %d (torn or misplaced)", block, sector, tag)
	}
	return tag, nil
}

const spb = 8 // sectors per 4 KiB block

type version [spb]uint32

// blockModel: the versions a block went through since the last verified
// state (history[0]); durable is the index of the oldest version a crash
// may still show (every version before it was superseded by a flushed one).
type blockModel struct {
	history []version
	durable int
}

type crashModel struct {
	blocks []blockModel
	tag    uint32 // last tag handed out; under mu
	mu     sync.Mutex
}

func (m *crashModel) nextTag() uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tag++
	return m.tag
}

// verify checks that every block shows one of its allowed versions and
// makes what it found the new base.
func (m *crashModel) verify(v *Volume, nblocks int) error {
	buf := make([]byte, nblocks*4096)
	if err := v.ReadAt(buf, 0); err != nil {
		return err
	}
	for b := 0; b < nblocks; b++ {
		var got version
		for s := 0; s < spb; s++ {
			tag, err := decodeSector(buf[b*4096+s*512:], uint64(b), s)
			if err != nil {
				return err
			}
			got[s] = tag
		}
		bm := &m.blocks[b]
		ok := false
		for _, h := range bm.history[bm.durable:] {
			if h == got {
				ok = true
				break
			}
		}
		if !ok {
			return fmt.Errorf("block %d reads as %v; allowed (from durable index %d): %v", b, got, bm.durable, bm.history)
		}
		bm.history = append(bm.history[:0], got)
		bm.durable = 0
	}
	return nil
}

// crashWriter runs random writes, sub-block writes, trims, FUA writes and
// flushes on the blocks [lo, hi) it owns until an error (the power cut).
//
// In uniform mode every write is one whole block, so records have equal
// sizes and a later life's records land exactly where an earlier life's
// discarded records lie: the case the WAL generation guards against.
func crashWriter(v *Volume, m *crashModel, lo, hi int, r *rand.Rand, ops int, uniform bool) {
	buf := make([]byte, 4*4096)
	for i := 0; i < ops; i++ {
		k := r.IntN(20)
		if uniform && k >= 2 {
			k = 2
		}
		switch {
		case k < 2: // flush
			lens := make([]int, hi-lo)
			for b := lo; b < hi; b++ {
				lens[b-lo] = len(m.blocks[b].history)
			}
			if v.Flush() != nil {
				return
			}
			for b := lo; b < hi; b++ {
				m.blocks[b].durable = lens[b-lo] - 1
			}
		default:
			// A write (or trim) of [sector s0, s0+ns) within our blocks.
			b0 := lo + r.IntN(hi-lo)
			maxBlocks := min(hi-b0, 3)
			var s0, ns int
			if uniform {
				s0, ns = b0*spb, spb
			} else if k < 10 { // whole blocks
				s0 = b0 * spb
				ns = (1 + r.IntN(maxBlocks)) * spb
			} else { // sector granular
				s0 = b0*spb + r.IntN(spb)
				ns = 1 + r.IntN(maxBlocks*spb-(s0-b0*spb))
			}
			trim := k >= 17
			fua := k == 16
			tag := uint32(0)
			if !trim {
				tag = m.nextTag()
			}
			blocks, _ := m.addVersions(buf, s0, ns, tag)
			var err error
			if trim {
				if r.IntN(2) == 0 {
					err = v.Trim(int64(s0)*512, int64(ns)*512)
				} else {
					err = v.WriteZeroes(int64(s0)*512, int64(ns)*512, true)
				}
			} else {
				err = v.WriteAt(buf[:ns*512], int64(s0)*512, fua)
			}
			if err != nil {
				return
			}
			if fua {
				m.markDurable(blocks)
			}
		}
	}
}

// addVersions fills buf with write tag's sectors [s0, s0+ns) and records
// the version it makes of each block it touches, before the write is
// issued (a write cut off by the power loss may or may not be present).
// It returns those blocks and the index of each one's new version.
func (m *crashModel) addVersions(buf []byte, s0, ns int, tag uint32) (blocks, idx []int) {
	for s := s0; s < s0+ns; s++ {
		fillSector(buf[(s-s0)*512:], tag, uint64(s/spb), s%spb)
	}
	for b := s0 / spb; b <= (s0+ns-1)/spb; b++ {
		bm := &m.blocks[b]
		nv := bm.history[len(bm.history)-1]
		for s := max(s0, b*spb); s < min(s0+ns, (b+1)*spb); s++ {
			nv[s%spb] = tag
		}
		bm.history = append(bm.history, nv)
		blocks = append(blocks, b)
		idx = append(idx, len(bm.history)-1)
	}
	return blocks, idx
}

// markDurable records that the newest version of each block is durable.
func (m *crashModel) markDurable(blocks []int) {
	for _, b := range blocks {
		m.blocks[b].durable = len(m.blocks[b].history) - 1
	}
}

// TestPowerCutRandomized: cycles of concurrent writes, sub-block writes,
// trims, FUA writes and flushes, a power cut at a random moment (unsynced
// writes dropped, or some kept and the last one torn), and a reopen. Every
// block must read back as a version allowed by the flushes that completed:
// flushed data present, anything else wholly present or absent per block.
func TestPowerCutRandomized(t *testing.T) {
	cycles := cyclesWanted()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BLOCKVOL_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (BLOCKVOL_CRASH_SEED), %d cycles", seed, cycles)
	r := rand.New(rand.NewPCG(seed, 42))
	const nblocks = 64
	const writers = 4
	fs := vfs.NewCrashFS()
	opts := Options{Size: nblocks * 4096, WALSize: 64 << 10, FS: fs, Logger: testLogger(t), WALFullTimeout: 200 * time.Millisecond}
	tr := &tracer{}
	v, err := Create("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	m := &crashModel{blocks: make([]blockModel, nblocks)}
	for b := range m.blocks {
		m.blocks[b].history = []version{{}}
	}
	start := time.Now()
	torn := 0
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
		cut := CutOptions(randomCut(r))
		clean := r.IntN(20) == 0 || os.Getenv("CRASH_ALL_CLEAN") != ""
		var newFS *vfs.CrashFS
		if !clean {
			// Cut after a random number of file operations (or when the
			// writers are done).
			waitOps(fs, fs.Ops()+int64(r.IntN(300)), &wg, 20*time.Microsecond)
			newFS = fs.PowerCut(vfs.CutOptions(cut))
			// The machine is gone: stop the old instance's goroutines
			// at once instead of letting them wait out their timeouts.
			v.fail(errors.New("test: power cut"))
			wg.Wait()
			v.Close() // stops the flusher; errors expected on a dead FS
			if cut.Tear {
				torn++
			}
		} else {
			wg.Wait()
			if err := v.Close(); err != nil {
				t.Fatalf("cycle %d: clean close: %v", c, err)
			}
			newFS = fs
		}
		fs = newFS
		opts.FS = fs
		tr.add("---- cycle %d cut %+v clean %v", c, cut, clean)
		v, err = openTraced("/vol", opts, tr)
		if err != nil {
			t.Fatalf("cycle %d: recovery failed (cut %+v): %v", c, cut, err)
		}
		if err := m.verify(v, nblocks); err != nil {
			t.Log(debugDump(v))
			if os.Getenv("BLOCKVOL_TRACE") != "" {
				os.WriteFile(os.Getenv("BLOCKVOL_TRACE"), []byte(strings.Join(tr.lines, "\n")), 0o644)
			}
			t.Fatalf("cycle %d (cut keep=%v tear=%v clean=%v): %v", c, cut.KeepProb, cut.Tear, clean, err)
		}
	}
	v.Close()
	batches := 0
	for _, l := range tr.lines {
		if strings.HasPrefix(l, "batch limited") {
			batches++
		}
	}
	t.Logf("%d cycles (%d with torn writes) in %v, %d tags; %d size-limited flush batches in the last %d trace lines", cycles, torn, time.Since(start), m.tag, batches, len(tr.lines))
}

// randomCut is one of the power cuts the crash tests draw: every unsynced
// write dropped, all kept with the last one torn, half kept with tearing,
// or 90% kept.
func randomCut(r *rand.Rand) vfs.CutOptions {
	var cut vfs.CutOptions
	switch r.IntN(4) {
	case 1:
		cut = vfs.CutOptions{KeepProb: 1, Tear: true}
	case 2:
		cut = vfs.CutOptions{KeepProb: 0.5, Tear: true}
	case 3:
		cut = vfs.CutOptions{KeepProb: 0.9}
	}
	cut.Rand = rand.New(rand.NewPCG(r.Uint64(), 7))
	return cut
}

// waitOps waits until fs has done target file operations, or until the
// workload in wg has ended: the moment a crash test cuts the power.
func waitOps(fs interface{ Ops() int64 }, target int64, wg *sync.WaitGroup, poll time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for fs.Ops() < target {
		select {
		case <-done:
			return
		default:
			time.Sleep(poll)
		}
	}
}

// CutOptions mirrors vfs.CutOptions (kept local for brevity above).
type CutOptions vfs.CutOptions

func TestENOSPCWritesNothing(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 256 << 10, FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	old := make([]byte, 8192)
	for i := range old {
		old[i] = 0x5a
	}
	if err := v.WriteAt(old, 0, true); err != nil {
		t.Fatal(err)
	}
	fs.Inject(vfs.Fault{Op: vfs.OpWrite, Name: WALFile, Err: errNoSpace})
	err = v.WriteAt(make([]byte, 8192), 0, false)
	if err == nil || !isNoSpace(err) {
		t.Fatalf("write on a full disk: %v", err)
	}
	got := mustRead(t, v, 0, 8192)
	if string(got) != string(old) {
		t.Fatal("failed write is visible")
	}
	if err := v.Flush(); err == nil {
		t.Fatal("flush after a failed WAL write succeeded")
	}
	fs.ClearFaults()
	v.Close()
	v2, err := Open("/vol", Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if got := mustRead(t, v2, 0, 8192); string(got) != string(old) {
		t.Fatal("after reopen the failed write is visible or the old data lost")
	}
	if err := v2.WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatalf("write after reopen: %v", err)
	}
}

func TestCreateOnFullDisk(t *testing.T) {
	fs := vfs.NewCrashFS()
	fs.Inject(vfs.Fault{Op: vfs.OpAllocate, Err: errNoSpace})
	_, err := Create("/vol", Options{Size: 1 << 20, FS: fs})
	if !isNoSpace(err) {
		t.Fatalf("create on a full disk: %v", err)
	}
	if existsFS(fs, "/vol") {
		t.Fatal("failed create left a volume")
	}
	if n := len(fs.Files()); n != 0 {
		t.Fatalf("failed create left %d files", n)
	}
}

func TestExtentEIORetried(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 256 << 10, FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	fs.Inject(vfs.Fault{Op: vfs.OpWrite, Name: ExtentFile, Count: 3, Err: errEIO})
	data := pattern(5, 64<<10)
	if err := v.WriteAt(data, 0, false); err != nil {
		t.Fatal(err)
	}
	waitCheckpoint(t, v) // the flusher retries until the fault is gone
	if got := mustRead(t, v, 0, len(data)); string(got) != string(data) {
		t.Fatal("data lost after extent write errors")
	}
}

func TestWALSyncEIOFailsStop(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 256 << 10, FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	fs.Inject(vfs.Fault{Op: vfs.OpSync, Name: WALFile, Err: errEIO})
	if err := v.Flush(); !errors.Is(err, errEIO) {
		t.Fatalf("flush with a failing fsync: %v", err)
	}
	if err := v.WriteAt(make([]byte, 4096), 0, false); err == nil {
		t.Fatal("write accepted after a failed WAL fsync")
	}
}

var (
	errNoSpace = syscall.ENOSPC
	errEIO     = syscall.EIO
)

func debugDump(v *Volume) string {
	var b strings.Builder
	fmt.Fprintf(&b, "sb: %+v\nhead %d ckpt %d tail %d/%d dirty %d zeros %d\n", v.sb, v.HeadLSN(), v.CheckpointLSN(), v.tailLSN.Load(), v.tailPos.Load(), v.dirty.len(), v.zeros.n.Load())
	res, err := wal.Scan(v.walF, v.ring, wal.ScanOptions{From: v.sb.TailPos, FirstLSN: v.sb.TailLSN}, func(pos uint64, r wal.Record) error {
		fmt.Fprintf(&b, "  pos %d lsn %d gen %d %s off %d len %d\n", pos, r.LSN, r.Gen, r.Type, r.Offset/4096, r.Length/4096)
		return nil
	})
	fmt.Fprintf(&b, "scan: %+v %v\n", res, err)
	return b.String()
}

type tracer struct {
	mu    sync.Mutex
	lines []string
}

func (t *tracer) add(format string, args ...any) {
	t.mu.Lock()
	t.lines = append(t.lines, fmt.Sprintf(format, args...))
	if len(t.lines) > 20000 {
		t.lines = t.lines[10000:]
	}
	t.mu.Unlock()
}

// openTraced opens with tracing on from the start (recovery included).
func openTraced(dir string, o Options, tr *tracer) (*Volume, error) {
	testTrace = tr.add
	defer func() { testTrace = nil }()
	return Open(dir, o)
}

// captureHandler records slog events for assertions.
type captureHandler struct {
	mu     sync.Mutex
	events []map[string]any
}

func (h *captureHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *captureHandler) Handle(_ context.Context, r slog.Record) error {
	ev := map[string]any{"msg": r.Message}
	r.Attrs(func(a slog.Attr) bool { ev[a.Key] = a.Value.Any(); return true })
	h.mu.Lock()
	h.events = append(h.events, ev)
	h.mu.Unlock()
	return nil
}
func (h *captureHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *captureHandler) WithGroup(string) slog.Handler      { return h }

func (h *captureHandler) find(msg string) map[string]any {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, e := range h.events {
		if e["msg"] == msg {
			return e
		}
	}
	return nil
}

// A torn last record is discarded with a logged decision naming where.
func TestTornTailLogged(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 256 << 10, FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	v.pauseFlusher.Store(true)
	data := pattern(1, 8192)
	if err := v.WriteAt(data, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(pattern(2, 16384), 65536, false); err != nil { // unsynced
		t.Fatal(err)
	}
	fs = fs.PowerCut(vfs.CutOptions{KeepProb: 1, Tear: true, Rand: rand.New(rand.NewPCG(1, 2))})
	v.fail(errors.New("test: power cut"))
	v.Close()
	h := &captureHandler{}
	v2, err := Open("/vol", Options{FS: fs, Logger: slog.New(h)})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if got := mustRead(t, v2, 0, 8192); string(got) != string(data) {
		t.Fatal("FUA write lost")
	}
	ev := h.find("engine_recovery_tail_discarded")
	if ev == nil {
		t.Fatalf("no tail-discarded event; events: %v", h.events)
	}
	if ev["lsn"] != uint64(2) {
		t.Fatalf("discarded LSN %v, want 2", ev["lsn"])
	}
	if rec := h.find("engine_recovery"); rec == nil || rec["records_replayed"] != int64(1) {
		t.Fatalf("recovery event %v", rec)
	}
	if v2.HeadLSN() != 1 {
		t.Fatalf("head LSN %d after discarding the torn record", v2.HeadLSN())
	}
}

// A create cut off by a power loss before the superblock leaves no volume,
// and creating again succeeds.
func TestCreateInterrupted(t *testing.T) {
	fs := vfs.NewCrashFS()
	fs.Inject(vfs.Fault{Op: vfs.OpOpen, Name: SuperblockFile, Err: errEIO, Count: 1})
	if _, err := Create("/vol", Options{Size: 1 << 20, WALSize: 256 << 10, FS: fs}); err == nil {
		t.Fatal("create succeeded despite the fault")
	}
	// Leave WAL and extent behind, as a crash in the middle would.
	for _, n := range []string{WALFile, ExtentFile} {
		f, err := fs.OpenFile("/vol/"+n, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if err := fs.SyncDir("/vol"); err != nil {
		t.Fatal(err)
	}
	fs = fs.PowerCut(vfs.CutOptions{})
	if _, err := fs.Stat("/vol/" + WALFile); err != nil {
		t.Fatalf("leftover WAL not durable: %v", err)
	}
	if existsFS(fs, "/vol") {
		t.Fatal("interrupted create left a volume")
	}
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 256 << 10, FS: fs})
	if err != nil {
		t.Fatalf("create after an interrupted one: %v", err)
	}
	v.Close()
}

// The extent's disk is full: writes go on into the WAL until it is full,
// then fail with ENOSPC (bounded wait) and change nothing; once space is
// back, the flusher drains and writes succeed again.
func TestExtentENOSPCBackPressure(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 64 << 10, FS: fs, WALFullTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	fs.Inject(vfs.Fault{Op: vfs.OpWrite, Name: ExtentFile, Err: errNoSpace})
	var werr error
	written := map[int64][]byte{}
	for i := 0; i < 100 && werr == nil; i++ {
		off := int64(i%200) * 4096
		p := pattern(uint64(i), 4096)
		if werr = v.WriteAt(p, off, false); werr == nil {
			written[off] = p
		}
	}
	if !errors.Is(werr, blockdev.ErrNoSpace) {
		t.Fatalf("writes into a full WAL over a full disk: %v", werr)
	}
	for off, p := range written {
		if got := mustRead(t, v, off, 4096); string(got) != string(p) {
			t.Fatalf("acknowledged write at %d lost", off)
		}
	}
	fs.ClearFaults()
	waitCheckpoint(t, v)
	if err := v.WriteAt(pattern(999, 4096), 0, true); err != nil {
		t.Fatalf("write after space came back: %v", err)
	}
}
