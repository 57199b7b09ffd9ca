package blockvol

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
)

// A large write is one record, redirected or not: after a crash it must
// be wholly present or wholly absent across all its blocks, not only per
// block. redirWrite remembers, for each block a write touched, the index
// of the version it created in that block's history.
type redirWrite struct {
	tag    uint32
	blocks []int
	idx    []int
}

type redirModel struct {
	crashModel
	mu     sync.Mutex
	writes []redirWrite
}

// verifyAtomic checks every block against its allowed versions (as
// crashModel.verify) and, for every multi-block write that shows in any
// of its blocks, that each of its blocks shows that write or a later
// version. It then makes what it found the new base.
func (m *redirModel) verifyAtomic(v *Volume, nblocks int) error {
	buf := make([]byte, nblocks*4096)
	if err := v.ReadAt(buf, 0); err != nil {
		return err
	}
	shown := make([]int, nblocks) // highest history index matching what the block shows
	got := make([]version, nblocks)
	for b := 0; b < nblocks; b++ {
		for s := 0; s < spb; s++ {
			tag, err := decodeSector(buf[b*4096+s*512:], uint64(b), s)
			if err != nil {
				return err
			}
			got[b][s] = tag
		}
		bm := &m.blocks[b]
		shown[b] = -1
		for i := len(bm.history) - 1; i >= bm.durable; i-- {
			if bm.history[i] == got[b] {
				shown[b] = i
				break
			}
		}
		if shown[b] < 0 {
			return fmt.Errorf("block %d reads as %v; allowed (from durable index %d): %v", b, got[b], bm.durable, bm.history)
		}
	}
	for _, w := range m.writes {
		if len(w.blocks) < 2 || w.tag == 0 {
			continue
		}
		present := -1
		for i, b := range w.blocks {
			if shown[b] == w.idx[i] {
				present = b
				break
			}
		}
		if present < 0 {
			continue
		}
		for i, b := range w.blocks {
			if shown[b] < w.idx[i] {
				return fmt.Errorf("write tag %d (blocks %d-%d) is present in block %d but block %d shows the older version %d (%v): torn across blocks",
					w.tag, w.blocks[0], w.blocks[len(w.blocks)-1], present, b, shown[b], got[b])
			}
		}
	}
	for b := 0; b < nblocks; b++ {
		bm := &m.blocks[b]
		bm.history = append(bm.history[:0], got[b])
		bm.durable = 0
	}
	m.writes = m.writes[:0]
	return nil
}

// redirWriter runs, on blocks [lo, hi) (whole chunks), large chunk-aligned
// writes (redirected), small writes and trims into the same chunks, FUA
// writes and flushes, until an error (the power cut).
func redirWriter(v *Volume, m *redirModel, lo, hi int, r *rand.Rand, ops int) {
	per := int(redirChunk / 4096)
	buf := make([]byte, (hi-lo)*4096)
	for i := 0; i < ops; i++ {
		k := r.IntN(20)
		if k < 2 {
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
			continue
		}
		var s0, ns int
		switch {
		case k < 12: // large: 2..(all) chunks, chunk-aligned
			chunks := (hi - lo) / per
			nc := 2 + r.IntN(chunks-1)
			c0 := r.IntN(chunks - nc + 1)
			s0, ns = (lo+c0*per)*spb, nc*per*spb
		case k < 16: // small: sectors or blocks inside our range
			b0 := lo + r.IntN(hi-lo)
			s0 = b0*spb + r.IntN(spb)
			ns = 1 + r.IntN(min(3*spb, (hi*spb)-s0))
		default: // trim up to two chunks
			b0 := lo + r.IntN(hi-lo)
			s0 = b0 * spb
			ns = (1 + r.IntN(min(2*per, hi-b0))) * spb
		}
		trim := k >= 18
		fua := k == 11 || k == 15
		tag := uint32(0)
		if !trim {
			tag = m.nextTag()
		}
		w := redirWrite{tag: tag}
		w.blocks, w.idx = m.addVersions(buf, s0, ns, tag)
		m.mu.Lock()
		m.writes = append(m.writes, w)
		m.mu.Unlock()
		var err error
		if trim {
			err = v.Trim(int64(s0)*512, int64(ns)*512)
		} else {
			err = v.WriteAt(buf[:ns*512], int64(s0)*512, fua)
		}
		if err != nil {
			return
		}
		if fua {
			m.markDurable(w.blocks)
		}
	}
}

// TestPowerCutRedirect: power cuts at random moments of large writes
// written once to the data files (redirect.go) mixed with small writes and
// trims of the same chunks, flushes and FUA writes, with the flusher
// checkpointing (a small WAL, which still takes the largest write as one
// record when it falls back to the log) and punching old slots. After each reopen
// every block must show a version the completed flushes allow, and every
// large write must be wholly present or wholly absent across its blocks.
func TestPowerCutRedirect(t *testing.T) {
	cycles := 300
	if testing.Short() {
		cycles = 100
	}
	if s := os.Getenv("BLOCKVOL_REDIRECT_CYCLES"); s != "" {
		cycles, _ = strconv.Atoi(s)
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BLOCKVOL_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (BLOCKVOL_CRASH_SEED), %d cycles", seed, cycles)
	r := rand.New(rand.NewPCG(seed, 43))
	const writers = 3
	per := int(redirChunk / 4096)
	chunksPer := 4
	nblocks := writers * chunksPer * per
	fs := vfs.NewCrashFS()
	opts := Options{Size: int64(nblocks) * 4096, WALSize: 1 << 20, FS: fs, Logger: testLogger(t), WALFullTimeout: 200 * time.Millisecond}
	// BLOCKVOL_REDIRECT_OFF=1: the same cycles with every write in the
	// WAL (the multi-block atomicity check applies there too).
	off := os.Getenv("BLOCKVOL_REDIRECT_OFF") != ""
	opts.NoRedirect = off
	tr := &tracer{}
	testTrace = tr.add
	v, err := Create("/vol", opts)
	testTrace = nil
	if err != nil {
		t.Fatal(err)
	}
	m := &redirModel{crashModel: crashModel{blocks: make([]blockModel, nblocks)}}
	for b := range m.blocks {
		m.blocks[b].history = []version{{}}
	}
	var redirects, discarded uint64
	for c := 0; c < cycles; c++ {
		var wg sync.WaitGroup
		opsPer := 5 + r.IntN(40)
		for w := 0; w < writers; w++ {
			wg.Add(1)
			wr := rand.New(rand.NewPCG(r.Uint64(), uint64(w)))
			go func(w int) {
				defer wg.Done()
				redirWriter(v, m, w*chunksPer*per, (w+1)*chunksPer*per, wr, opsPer)
			}(w)
		}
		// Every other cycle the backlog's bound is one chunk, and a
		// goroutine runs the flusher's punches (punchDue) all along, as
		// ticks would: old slots are punched while writers run and the
		// power is cut. The other cycles punch at Close and after
		// reopens only (the default bound, ticks too rare to fire).
		// Two cycles in three checkpoint pending redirects past half
		// the WAL, as the engine did before redirectPendingMax, so that
		// checkpoints taken while redirects are in flight stay covered;
		// the third leaves them to the WAL's own fill and to flushes.
		if c%3 != 0 {
			v.slots.pendMax.Store(int64(flushHighWater(opts.WALSize)))
		}
		punching := make(chan struct{})
		punched := make(chan struct{})
		if c%2 == 1 {
			v.slots.punchDiv.Store(1 << 30)
			pr := rand.New(rand.NewPCG(r.Uint64(), 99))
			go func(v *Volume) {
				defer close(punched)
				for {
					select {
					case <-punching:
						return
					default:
					}
					v.punchDue(pr.IntN(2) == 0)
					time.Sleep(50 * time.Microsecond)
				}
			}(v)
		} else {
			close(punched)
		}
		cut := randomCut(r)
		clean := r.IntN(20) == 0
		newFS := fs
		if !clean {
			waitOps(fs, fs.Ops()+int64(r.IntN(400)), &wg, 20*time.Microsecond)
			newFS = fs.PowerCut(cut)
			v.fail(errors.New("test: power cut"))
			wg.Wait()
			close(punching)
			<-punched
			v.Close()
		} else {
			wg.Wait()
			close(punching)
			<-punched
			if err := v.Close(); err != nil {
				t.Fatalf("cycle %d: clean close: %v", c, err)
			}
		}
		redirects += v.Stats().RedirectWrites
		fs = newFS
		opts.FS = fs
		h := &captureHandler{}
		o := opts
		o.Logger = slog.New(h)
		tr.add("---- cycle %d cut %+v clean %v", c, cut, clean)
		v, err = openTraced("/vol", o, tr)
		if err != nil {
			t.Fatalf("cycle %d: recovery failed (cut %+v): %v", c, cut, err)
		}
		if e := h.find("engine_recovery"); e != nil {
			if n, ok := e["redirects_discarded"].(int64); ok {
				discarded += uint64(n)
			}
		}
		if err := m.verifyAtomic(v, nblocks); err != nil {
			t.Log(debugDump(v))
			if f := os.Getenv("BLOCKVOL_TRACE"); f != "" {
				os.WriteFile(f, []byte(strings.Join(tr.lines, "\n")), 0o644)
			}
			t.Fatalf("cycle %d (cut keep=%v tear=%v clean=%v): %v", c, cut.KeepProb, cut.Tear, clean, err)
		}
	}
	v.Close()
	if redirects == 0 && !off {
		t.Fatal("no write took the redirect path: the test tests nothing")
	}
	t.Logf("%d cycles, %d redirected writes, %d redirects discarded by recovery (torn or overwritten, never flushed), %d tags", cycles, redirects, discarded, m.tag)
}
