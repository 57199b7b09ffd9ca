package blockvol

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/blockd/blockd/wal"
)

// flusher runs flush cycles when nudged (the log passed flushHighWater, a
// writer waits for space, many zero ranges) or, every flushInterval, when
// the log was idle since the previous tick; it keeps going while the
// unflushed log is above flushLowWater. While writes keep coming and the
// log is below flushHighWater the tick leaves it alone: a block rewritten
// while its older version is still in the log reaches the extent once.
func (v *Volume) flusher() {
	defer close(v.stopped)
	t := time.NewTicker(flushInterval)
	defer t.Stop()
	lastHead := v.headLSN.Load()
	for {
		idle := false
		select {
		case <-v.stop:
			return
		case <-v.nudge:
		case <-t.C:
			h := v.headLSN.Load()
			idle = h == lastHead
			lastHead = h
			if !v.pauseFlusher.Load() {
				v.punchDue(idle) // redirect_slots.go: old slots, outside any checkpoint
			}
			_, end := v.comp.get()
			if !idle && end-v.ckptPos.Load() < flushHighWater(v.walSize) && v.zeros.n.Load() < 32 && !v.redirectsDue() {
				continue
			}
		}
		if v.pauseFlusher.Load() {
			continue
		}
		v.flushEpisode(idle)
	}
}

// flushEpisode runs flush cycles until the log is below flushLowWater, or
// empty when drain (an idle log) unless writes resume, or until a cycle
// makes no progress or fails.
func (v *Volume) flushEpisode(drain bool) {
	head0 := v.headLSN.Load()
	for {
		progressed, err := v.flushCycle()
		if err != nil {
			e := err
			if v.flushErr.Swap(&e) == nil {
				v.log.Error("engine_flusher_error", "err", err)
			}
			select {
			case <-v.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			break
		}
		if v.flushErr.Load() != nil {
			v.flushErr.Store(nil)
			v.log.Info("engine_flusher_recovered")
		}
		if !progressed {
			break
		}
		_, end := v.comp.get()
		if (!drain || v.headLSN.Load() != head0) && end-v.ckptPos.Load() < flushLowWater(v.walSize) && v.zeros.n.Load() < 32 && !v.redirectsDue() {
			break
		}
		select {
		case <-v.stop:
			return
		default:
		}
	}
}

// flushCycle moves one batch (at most flushBatchBytes of log) from the WAL
// to the extent: sync the WAL up to what is complete, copy the batch's
// dirty blocks and apply its zero ranges, fdatasync the extent, drop the
// flushed entries, persist the new checkpoint and tail in the superblock,
// and only then let writers reuse the space. It reports whether the
// checkpoint or the tail moved.
func (v *Volume) flushCycle() (bool, error) {
	// The holds are read before any lock is taken: no owner's code runs
	// under the flusher's locks.
	floor, held := v.retentionFloor()
	v.flushMu.Lock()
	defer v.flushMu.Unlock()
	if err := v.failErr(); err != nil {
		return false, err
	}
	done, _ := v.comp.get()
	if err := v.syncWAL(done); err != nil {
		return false, err
	}
	durLSN, durEnd := v.durable()
	ckLSN, ckPos := v.ckptLSN.Load(), v.ckptPos.Load()
	target, targetEnd := ckLSN, ckPos
	if durLSN > ckLSN {
		target, targetEnd = durLSN, durEnd
		if batch := v.flushBatch(); durEnd-ckPos > batch {
			var err error
			target, targetEnd, err = v.lsnEndingBy(ckLSN, ckPos, ckPos+batch, durLSN)
			if err != nil {
				return false, err
			}
			if v.trace != nil {
				v.trace("batch limited to lsn=%d end=%d (durable %d)", target, targetEnd, durLSN)
			}
		}
	}
	if c := v.ckptCeil.Load(); c != 0 && target >= c {
		if c-1 <= ckLSN {
			target, targetEnd = ckLSN, ckPos
		} else {
			end, err := v.posOf(c)
			if err != nil {
				return false, err
			}
			target, targetEnd = c-1, end
		}
	}
	var ents []dirtyEnt
	if target > ckLSN {
		// A block whose newest version is not durable yet is not written
		// (a crash may lose that record, and the extent would then hold
		// part of a multi-block write); the checkpoint stays before its
		// older version in the batch instead. That version was complete
		// before the sync above, so this only holds back what the next
		// cycle takes. Both come from one pass over the dirty map: a
		// writer replacing a version between two passes would slip
		// through both.
		var cut uint64
		ents, cut = v.dirty.collect(nil, targetEnd, durEnd)
		if cut < targetEnd {
			t, e, err := v.lsnEndingBy(ckLSN, ckPos, cut, target)
			if err != nil {
				return false, err
			}
			if e > cut {
				t, e = ckLSN, ckPos
			}
			if v.trace != nil {
				v.trace("batch cut to lsn=%d end=%d before an undurable block version at %d", t, e, cut)
			}
			target, targetEnd = t, e
		}
	}
	if target > ckLSN {
		if err := v.applyCollected(ents, durEnd); err != nil {
			return false, err
		}
	}
	// The new tail: right after the checkpoint, unless a retention hold
	// keeps older records (for replication).
	tailLSN := v.tailLSN.Load()
	newTailLSN, newTailPos := target+1, targetEnd
	if held && floor < newTailLSN {
		newTailLSN = max(floor, tailLSN)
		var err error
		if newTailPos, err = v.posOf(newTailLSN); err != nil {
			return false, err
		}
	}
	if target == ckLSN && newTailLSN == tailLSN {
		return false, nil
	}
	// The slot bits as of target go first (redirect.go).
	if err := v.stageSlots(target, target); err != nil {
		return false, fmt.Errorf("checkpoint LSN %d: %w", target, err)
	}
	v.superMu.Lock()
	v.sb.CheckpointLSN, v.sb.CheckpointPos = target, targetEnd
	v.sb.TailLSN, v.sb.TailPos = newTailLSN, newTailPos
	// Never lower: a settle (redirect.go) may have persisted a higher one
	// since durLSN was read, and records up to it count on it.
	trusted := max(v.sb.DurableLSN, v.slots.capTrust(durLSN))
	v.sb.DurableLSN = trusted
	err := v.persistSuperblock()
	v.superMu.Unlock()
	if err != nil {
		return false, fmt.Errorf("checkpoint LSN %d: %w", target, err)
	}
	v.slots.trustLSN.Store(trusted)
	v.commitSlots(target)
	if v.trace != nil {
		v.trace("checkpoint lsn=%d pos=%d tail=%d/%d dur=%d", target, targetEnd, newTailLSN, newTailPos, durLSN)
	}
	v.ckptLSN.Store(target)
	v.ckptPos.Store(targetEnd)
	v.appendMu.Lock()
	v.tailLSN.Store(newTailLSN)
	v.tailPos.Store(newTailPos)
	v.index.trim(newTailLSN, newTailPos)
	close(v.spaceCh)
	v.spaceCh = make(chan struct{})
	v.appendMu.Unlock()
	return true, nil
}

// applyToExtent writes into the extent, and syncs, every dirty block with
// a version before log position end (its newest version, wherever that
// lies: see dirtyMap), and every zero range; then
// drops them from the dirty map and zero set. Zero ranges are all applied
// because a block written now may be newer than a pending trim of it,
// which must therefore not be punched later. Entries are collected before
// zero ranges: a zero range older than a collected entry of the same block
// was added before that entry (stripe locks order them), so it is seen.
//
// Entries older than an applied zero range, wherever they lie and whenever
// they were added, are dropped after the punch is synced: once the range is
// removed nothing else would hide them from readers.
//
// Only durable versions (log position before durEnd) are written and only
// durable zero ranges applied: what a crash may still lose must not reach
// the extent, where it would outlive its record, for part of its blocks.
func (v *Volume) applyToExtent(end, durEnd uint64) error {
	ents, _ := v.dirty.collect(nil, end, durEnd)
	return v.applyCollected(ents, durEnd)
}

// applyCollected is applyToExtent for entries already collected.
func (v *Volume) applyCollected(ents []dirtyEnt, durEnd uint64) error {
	zr := v.zeros.collectBelow(durEnd)
	if v.trace != nil {
		v.trace("flush durable end=%d ents=%v zr=%v", durEnd, ents, zr)
	}
	// Snapshots first: the newest one keeps what is about to be
	// overwritten (durably) before the extent changes.
	if err := v.cowBeforeFlush(ents, zr); err != nil {
		return err
	}
	for _, z := range zr {
		off, n := int64(z.start)<<v.bshift, int64(z.end-z.start)<<v.bshift
		if err := v.punchData(off, n); err != nil {
			return fmt.Errorf("punch extent [%d,+%d): %w", off, n, err)
		}
	}
	if err := v.copyToExtent(ents, zr); err != nil {
		return err
	}
	if len(ents) > 0 || len(zr) > 0 {
		if err := v.syncData(); err != nil {
			return fmt.Errorf("sync extent: %w", err)
		}
	}
	// Readers must find, at every step, the newest version or something
	// equal to it (see classify): first the entries an applied zero range
	// hides (the range still answers for them), then the ranges (newer
	// entries still answer for their blocks), and only then the written
	// entries. Dropping written entries first let a read between the
	// steps see the zero range instead of the write that followed it.
	if len(zr) > 0 {
		v.dirty.removeFn(func(b, pos uint64) bool { return superseded(zr, dirtyEnt{b, pos}) })
	}
	v.zeros.remove(zr)
	v.dirty.flushed(ents)
	return nil
}

const (
	flushRunMax = 1 << 20  // largest WAL read of one window
	flushGapMax = 64 << 10 // a window skips at most this much unneeded log
	// flushStageMax bounds the staging buffer of one pass (2,048 blocks
	// of 4 KiB). Larger, it would sit in the heap and, through the GC's
	// heap goal, let as much garbage again accumulate: a 32 MiB stage
	// took blockd's peak RSS under 4 KiB random writes from 40 to 120 MiB.
	flushStageMax = 8 << 20
)

// copyToExtent copies the newest data of the collected blocks (those not
// superseded by a zero range) from the WAL to the extent, in passes over
// at most flushStageMax bytes of blocks taken in log order. A pass reads
// the WAL in windows of up to flushRunMax bytes (one pread for many
// records instead of one per block) and places each block in a staging
// buffer at its rank in block order; then every run of consecutive blocks
// goes to the extent in one pwrite, wherever its blocks lay in the log.
func (v *Volume) copyToExtent(ents []dirtyEnt, zr []zeroRange) error {
	bs := uint64(v.bs)
	w := make([]dirtyEnt, 0, len(ents))
	for _, e := range ents {
		if !superseded(zr, e) {
			w = append(w, e)
		}
	}
	slices.SortFunc(w, func(a, b dirtyEnt) int { return cmp.Compare(a.pos, b.pos) })
	per := max(int(flushStageMax/bs), 1)
	for len(w) > 0 {
		n := min(len(w), per)
		if err := v.copyPass(w[:n]); err != nil {
			return err
		}
		w = w[n:]
	}
	return nil
}

// copyPass is one pass of copyToExtent over w, sorted by log position.
func (v *Volume) copyPass(w []dirtyEnt) error {
	bs := uint64(v.bs)
	need := len(w)*int(bs) + flushRunMax
	buf := getStage(need)
	defer putStage(buf)
	stage := buf[:len(w)*int(bs)]
	win := buf[len(stage):need]
	// byBlock: the entries in block order; rank[i]: entry i's slot.
	byBlock := make([]int32, len(w))
	for i := range byBlock {
		byBlock[i] = int32(i)
	}
	slices.SortFunc(byBlock, func(a, b int32) int { return cmp.Compare(w[a].block, w[b].block) })
	rank := make([]int32, len(w))
	for r, i := range byBlock {
		rank[i] = int32(r)
	}
	for i := 0; i < len(w); {
		start := w[i].pos
		lim := start + uint64(min(int64(flushRunMax), v.ring.Remaining(start)))
		j := i + 1
		for j < len(w) && w[j].pos+bs <= lim && w[j].pos-w[j-1].pos <= flushGapMax {
			j++
		}
		rd := win[:w[j-1].pos+bs-start]
		if _, err := v.walF.ReadAt(rd, v.ring.Phys(start)); err != nil {
			return fmt.Errorf("flusher read WAL at %d: %w", start, err)
		}
		for k := i; k < j; k++ {
			slot := uint64(rank[k])
			o := w[k].pos - start
			copy(stage[slot*bs:(slot+1)*bs], rd[o:o+bs])
		}
		i = j
	}
	for k := 0; k < len(byBlock); {
		m := k + 1
		for m < len(byBlock) && w[byBlock[m]].block == w[byBlock[m-1]].block+1 && uint64(m-k)*bs < flushWriteMax {
			m++
		}
		first := w[byBlock[k]].block
		if err := v.writeData(stage[uint64(k)*bs:uint64(m)*bs], int64(first)<<v.bshift); err != nil {
			return fmt.Errorf("flusher write extent block %d: %w", first, err)
		}
		v.flushWrites.Add(1)
		k = m
	}
	return nil
}

// flushWriteMax bounds one extent pwrite of the flusher.
const flushWriteMax = 8 << 20

// Staging buffers are shared by the flushers of every volume in the
// process and kept for reuse: at most stageBuffers exist (a flusher waits
// for one), so the memory they take is bounded by stageBuffers x
// (flushStageMax + flushRunMax) however many volumes there are, and a
// buffer allocated per flush cycle does not leave tens of MiB of garbage
// behind for the GC.
const stageBuffers = 2

var (
	stageSem  = make(chan struct{}, stageBuffers)
	stageFree = make(chan []byte, stageBuffers)
)

func getStage(n int) []byte {
	stageSem <- struct{}{}
	var b []byte
	select {
	case b = <-stageFree:
	default:
	}
	if cap(b) < n {
		b = make([]byte, n)
	}
	return b[:n]
}

func putStage(b []byte) {
	stageFree <- b
	<-stageSem
}

func superseded(zr []zeroRange, e dirtyEnt) bool {
	for _, z := range zr {
		if e.block >= z.start && e.block < z.end && z.pos > e.pos {
			return true
		}
	}
	return false
}

// flushBatch is the most log one flush cycle checkpoints: flushBatchBytes,
// or a quarter of a small WAL (so space comes back in steps there too).
func (v *Volume) flushBatch() uint64 {
	return uint64(min(flushBatchBytes, v.walSize/4))
}

// posOf returns the log position where the record lsn (its reservation,
// padding included) starts. lsn must be retained and at most done+1.
func (v *Volume) posOf(lsn uint64) (uint64, error) {
	v.appendMu.Lock()
	e := v.index.lookup(lsn)
	v.appendMu.Unlock()
	pos, cur := e.pos, e.lsn
	var hdr [wal.HeaderSize]byte
	for cur < lsn {
		if rem := v.ring.Remaining(pos); rem < wal.HeaderSize {
			pos += uint64(rem)
		}
		if _, err := v.walF.ReadAt(hdr[:], v.ring.Phys(pos)); err != nil {
			return 0, fmt.Errorf("walk WAL at %d: %w", pos, err)
		}
		h, size, err := wal.DecodeHeader(hdr[:])
		if err != nil || h.LSN != cur {
			return 0, fmt.Errorf("%w: walking WAL at %d for LSN %d: header LSN %d: %v", ErrCorrupt, pos, cur, h.LSN, err)
		}
		pos += uint64(size)
		if h.Type != wal.Padding {
			cur++
		}
	}
	return pos, nil
}

// lsnEndingBy finds the largest LSN in (ckLSN, maxLSN] whose record ends
// at or before limit (at least ckLSN+1), and its end position.
func (v *Volume) lsnEndingBy(ckLSN, ckPos, limit, maxLSN uint64) (uint64, uint64, error) {
	v.appendMu.Lock()
	e := v.index.lookupPos(limit)
	v.appendMu.Unlock()
	cur, pos := e.lsn, e.pos
	if cur <= ckLSN {
		cur, pos = ckLSN+1, ckPos
	}
	// pos is where record cur starts; walk while it ends by limit.
	bestLSN, bestEnd := cur-1, pos
	var hdr [wal.HeaderSize]byte
	for cur <= maxLSN {
		if rem := v.ring.Remaining(pos); rem < wal.HeaderSize {
			pos += uint64(rem)
		}
		if _, err := v.walF.ReadAt(hdr[:], v.ring.Phys(pos)); err != nil {
			return 0, 0, fmt.Errorf("walk WAL at %d: %w", pos, err)
		}
		h, size, err := wal.DecodeHeader(hdr[:])
		if err != nil || h.LSN != cur {
			return 0, 0, fmt.Errorf("%w: walking WAL at %d for LSN %d: header LSN %d: %v", ErrCorrupt, pos, cur, h.LSN, err)
		}
		pos += uint64(size)
		if h.Type == wal.Padding {
			continue
		}
		if pos > limit && bestLSN > ckLSN {
			break
		}
		bestLSN, bestEnd = cur, pos
		cur++
		if pos > limit {
			break
		}
	}
	return bestLSN, bestEnd, nil
}
