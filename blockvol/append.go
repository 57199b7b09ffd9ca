package blockvol

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

// completion tracks which reserved records have been written (pwrite done
// and dirty map updated). Records complete out of order; done is the
// highest LSN below which every record is complete, and doneEnd the log
// position after it. Flush and the flusher only ever act on done records,
// so a hole left by a slow writer is never synced over or checkpointed.
type completion struct {
	mu      sync.Mutex
	cond    sync.Cond
	done    uint64
	doneEnd uint64
	doneA   atomic.Uint64 // done, readable without mu
	// ends[lsn&compMask] is the end position of a completed record above
	// done (0: not complete yet).
	ends [compWindow]uint64
}

const (
	compWindow = 1 << 14
	compMask   = compWindow - 1
)

func (c *completion) init(done, end uint64) {
	c.cond.L = &c.mu
	c.done, c.doneEnd = done, end
	c.doneA.Store(done)
}

func (c *completion) markDone(lsn, end uint64) {
	c.mu.Lock()
	if c.completeLocked(lsn, end) {
		c.doneA.Store(c.done)
		c.cond.Broadcast()
	}
	c.mu.Unlock()
}

// completeLocked records that record lsn ended at end. When it is the
// next one after done, done advances over it and over every later record
// already complete, and it reports true; otherwise the end waits in ends.
func (c *completion) completeLocked(lsn, end uint64) bool {
	if lsn != c.done+1 {
		c.ends[lsn&compMask] = end
		return false
	}
	c.done, c.doneEnd = lsn, end
	for {
		i := (c.done + 1) & compMask
		e := c.ends[i]
		if e == 0 {
			return true
		}
		c.ends[i] = 0
		c.done++
		c.doneEnd = e
	}
}

func (c *completion) get() (uint64, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.done, c.doneEnd
}

func (c *completion) wakeAll() {
	c.mu.Lock()
	c.cond.Broadcast()
	c.mu.Unlock()
}

// groupCommit shares one WAL fdatasync among concurrent flushes: the first
// caller syncs at once (no added delay); callers that arrive while a sync
// runs wait for it and, if it did not cover them, one of them leads the
// next sync for all of them.
type groupCommit struct {
	mu      sync.Mutex
	cond    sync.Cond
	syncing bool
	durLSN  uint64
	durEnd  uint64
	syncs   atomic.Int64 // fdatasyncs done (for benchmarks)
}

// syncWAL makes every record with LSN <= target durable.
func (v *Volume) syncWAL(target uint64) error {
	if target == 0 {
		return v.failErr()
	}
	c := &v.comp
	c.mu.Lock()
	for c.done < target && v.failed.Load() == nil {
		c.cond.Wait()
	}
	c.mu.Unlock()
	if err := v.failErr(); err != nil {
		return err
	}
	g := &v.gc
	g.mu.Lock()
	for {
		if g.durLSN >= target {
			g.mu.Unlock()
			return nil
		}
		if err := v.failErr(); err != nil {
			// A sync failed while this one waited: nothing more may
			// be promised (see below).
			g.mu.Unlock()
			return err
		}
		if !g.syncing {
			break
		}
		g.cond.Wait()
	}
	g.syncing = true
	g.mu.Unlock()
	// No in-place redirect may be between choosing its slot and
	// completing while the LSN this sync covers is chosen (redirect.go).
	lsn, end, err := v.chooseSyncLSN()
	if err != nil {
		g.mu.Lock()
		g.syncing = false
		g.cond.Broadcast()
		g.mu.Unlock()
		return err
	}
	if v.slots.unsynced.Swap(false) {
		// Redirected data of records this sync covers: before the log.
		if err = v.shF.Sync(); err == nil {
			err = v.extF.Sync()
		}
		if err != nil {
			err = fmt.Errorf("sync redirected data: %w", err)
		}
	}
	if v.trace != nil {
		v.trace("sync lsn=%d", lsn)
	}
	if err == nil {
		err = v.walF.Sync()
	}
	g.syncs.Add(1)
	if err != nil {
		// After a failed fsync the page cache state is unknown
		// (fsyncgate), and the next fdatasync of the file would
		// report success: stop before the waiters wake, or one of
		// them would lead that sync and promise the lost records.
		v.fail(err)
	}
	g.mu.Lock()
	g.syncing = false
	if err == nil && lsn > g.durLSN {
		v.stats.observeBatch(lsn - g.durLSN)
		g.durLSN, g.durEnd = lsn, end
		v.durLSN.Store(lsn)
	}
	g.cond.Broadcast()
	g.mu.Unlock()
	if v.trace != nil {
		v.trace("sync done lsn=%d err=%v", lsn, err)
	}
	if err != nil {
		return ioError(fmt.Errorf("sync WAL: %w", err))
	}
	return nil
}

func (v *Volume) durable() (uint64, uint64) {
	v.gc.mu.Lock()
	defer v.gc.mu.Unlock()
	return v.gc.durLSN, v.gc.durEnd
}

// Write buffers: header and payload go out in one pwrite for records up to
// pooledMax; bigger ones use two pwrites (header, payload).
const pooledMax = 256 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}

func getBuf(n int) *[]byte {
	bp := bufPool.Get().(*[]byte)
	if cap(*bp) < n {
		*bp = make([]byte, n)
	}
	*bp = (*bp)[:n]
	return bp
}

func putBuf(bp *[]byte) {
	if cap(*bp) <= pooledMax+wal.HeaderSize+wal.Align {
		bufPool.Put(bp)
	}
}

// appendRecord appends one record: it reserves the LSN and log space under
// appendMu (waiting, bounded, for space), writes the record outside the
// lock, applies it to the dirty map and marks it complete. rec.LSN is
// assigned unless fixedLSN (replica side: it must be the next LSN).
// rec.Epoch is the volume's epoch unless fixedLSN.
func (v *Volume) appendRecord(rec wal.Record, fixedLSN bool) (uint64, error) {
	return v.appendRecordWith(rec, fixedLSN, nil)
}

// recordHook lets a redirected write (redirect.go) run its steps inside
// appendRecord: feedAs is what the record feed gets instead of rec;
// before runs once the LSN is reserved, before the record is written (it
// may fill in rec's payload, whose size is fixed); applied runs where a
// Write updates the dirty map, before the record completes; done runs
// after completion or failure, once before ran (or is nil).
type recordHook struct {
	feedAs  *wal.Record
	before  func(lsn uint64, payload []byte) error
	applied func(rec wal.Record, start uint64)
	done    func()
}

func (v *Volume) appendRecordWith(rec wal.Record, fixedLSN bool, hook *recordHook) (uint64, error) {
	size := rec.Size()
	if int64(size) > v.walSize/2 {
		return 0, fmt.Errorf("record of %d bytes too large for a %d-byte WAL: %w", size, v.walSize, blockdev.ErrTooLarge)
	}
	v.appendMu.Lock()
	var start uint64
	var gap int64
	var deadline time.Time
	for {
		if err := v.failErr(); err != nil {
			v.appendMu.Unlock()
			return 0, err
		}
		start, gap = v.ring.Place(v.head, size)
		if start+uint64(size)-v.tailPos.Load() <= uint64(v.walSize) && v.nextLSN-v.comp.doneRelaxed() < compWindow-1 {
			break
		}
		// The log is full: nudge the flusher and wait for the tail.
		if deadline.IsZero() {
			deadline = time.Now().Add(v.fullTO)
			v.stats.backPressureWaits.Add(1)
		}
		ch := v.spaceCh
		v.appendMu.Unlock()
		v.kick()
		wait := time.Until(deadline)
		if wait <= 0 {
			return 0, v.walFullError()
		}
		t := time.NewTimer(min(wait, 50*time.Millisecond))
		select {
		case <-ch:
		case <-t.C:
		case <-v.stop:
		}
		t.Stop()
		v.appendMu.Lock()
	}
	if fixedLSN {
		if rec.LSN != v.nextLSN {
			want := v.nextLSN
			v.appendMu.Unlock()
			return 0, fmt.Errorf("apply record LSN %d, expected %d: %w", rec.LSN, want, blockdev.ErrInvalid)
		}
	} else {
		rec.LSN = v.nextLSN
		rec.Epoch = v.epoch.Load()
	}
	rec.Gen = v.gen
	if rec.Type == wal.SnapshotDelete {
		// Set before the record can complete: the flusher sees it once
		// it could checkpoint the record (see snapshotDeleteLocked).
		v.ckptCeil.Store(rec.LSN)
	}
	v.nextLSN++
	resStart := v.head
	v.head = start + uint64(size)
	v.index.add(rec.LSN, resStart)
	if v.feed != nil {
		// A copy into the feed (no subscriber code runs here), before the
		// head moves: a record at or below HeadLSN is always in the feed.
		if hook != nil && hook.feedAs != nil {
			fr := *hook.feedAs
			fr.LSN, fr.Epoch, fr.Gen = rec.LSN, rec.Epoch, rec.Gen
			v.feed.push(fr)
		} else {
			v.feed.push(rec)
		}
	}
	v.headLSN.Store(rec.LSN)
	used := v.head - v.ckptPos.Load()
	v.appendMu.Unlock()
	if used >= flushHighWater(v.walSize) {
		v.kick()
	}
	if hook != nil && hook.before != nil {
		defer hook.done()
		if err := hook.before(rec.LSN, rec.Payload); err != nil {
			// The LSN is reserved and will never complete: stop.
			v.fail(err)
			return 0, ioError(fmt.Errorf("append LSN %d: write data: %w", rec.LSN, err))
		}
	}

	if err := v.writeRecord(rec, start, resStart, gap); err != nil {
		v.fail(err)
		return 0, ioError(fmt.Errorf("append LSN %d: %w", rec.LSN, err))
	}
	dataPos := start + wal.HeaderSize
	if v.trace != nil {
		v.trace("append lsn=%d gen=%d %s blk=%d n=%d start=%d", rec.LSN, rec.Gen, rec.Type, rec.Offset>>v.bshift, rec.Length>>v.bshift, start)
	}
	switch rec.Type {
	case wal.Write:
		v.dirty.putRange(uint64(rec.Offset)>>v.bshift, uint64(rec.Length)>>v.bshift, dataPos, uint64(v.bs))
	case wal.Zero:
		v.zeros.add(uint64(rec.Offset)>>v.bshift, uint64(rec.Offset+int64(rec.Length))>>v.bshift, start)
	case wal.Redirect:
		hook.applied(rec, start)
	}
	v.comp.markDone(rec.LSN, start+uint64(size))
	return rec.LSN, nil
}

func (c *completion) doneRelaxed() uint64 { return c.doneA.Load() }

func (v *Volume) writeRecord(rec wal.Record, start, resStart uint64, gap int64) error {
	if gap >= wal.HeaderSize {
		var hdr [wal.HeaderSize]byte
		wal.PutHeader(hdr[:], wal.Record{Type: wal.Padding, LSN: rec.LSN, Gen: rec.Gen, Length: uint32(gap - wal.HeaderSize)}, nil)
		if _, err := v.walF.WriteAt(hdr[:], v.ring.Phys(resStart)); err != nil {
			return err
		}
	}
	size := rec.Size()
	phys := v.ring.Phys(start)
	if size <= pooledMax+wal.HeaderSize+wal.Align {
		bp := getBuf(size)
		wal.EncodeInto(*bp, rec)
		_, err := v.walF.WriteAt(*bp, phys)
		putBuf(bp)
		return err
	}
	var hdr [wal.HeaderSize]byte
	wal.PutHeader(hdr[:], rec, rec.Payload)
	if _, err := v.walF.WriteAt(rec.Payload, phys+wal.HeaderSize); err != nil {
		return err
	}
	_, err := v.walF.WriteAt(hdr[:], phys)
	return err
}

// waitLogSpace waits, bounded like a writer, until a record of size bytes
// fits in the log, nudging the flusher: for callers that then append with
// the flusher stopped (flushMu held), which no space could come back to.
func (v *Volume) waitLogSpace(size int) error {
	deadline := time.Now().Add(v.fullTO)
	for {
		v.appendMu.Lock()
		start, _ := v.ring.Place(v.head, size)
		ok := start+uint64(size)-v.tailPos.Load() <= uint64(v.walSize)
		ch := v.spaceCh
		v.appendMu.Unlock()
		if ok {
			return nil
		}
		if err := v.failErr(); err != nil {
			return err
		}
		v.kick()
		wait := time.Until(deadline)
		if wait <= 0 {
			return v.walFullError()
		}
		t := time.NewTimer(min(wait, 50*time.Millisecond))
		select {
		case <-ch:
		case <-t.C:
		case <-v.stop:
		}
		t.Stop()
	}
}

func (v *Volume) walFullError() error {
	if p := v.flushErr.Load(); p != nil {
		return ioError(fmt.Errorf("WAL full for %v, flusher failing: %w", v.fullTO, *p))
	}
	return fmt.Errorf("WAL full for %v: %w", v.fullTO, blockdev.ErrIO)
}

func (v *Volume) kick() {
	select {
	case v.nudge <- struct{}{}:
	default:
	}
}

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) || errors.Is(err, blockdev.ErrNoSpace)
}

func mapNoSpace(err error) error {
	if isNoSpace(err) && !errors.Is(err, blockdev.ErrNoSpace) {
		return fmt.Errorf("%w: %w", blockdev.ErrNoSpace, err)
	}
	return err
}

// lsnIndex is a sparse map from LSN to the log position where its
// reservation starts: one entry every indexEvery LSNs plus one at the
// tail. Positions of other LSNs are found by walking record headers.
type lsnIndex struct {
	e     []idxEnt
	first int
}

type idxEnt struct{ lsn, pos uint64 }

const indexEvery = 64

func (x *lsnIndex) reset(lsn, pos uint64) {
	x.e = append(x.e[:0], idxEnt{lsn, pos})
	x.first = 0
}

func (x *lsnIndex) add(lsn, pos uint64) {
	if lsn%indexEvery == 0 {
		x.e = append(x.e, idxEnt{lsn, pos})
	}
}

// lookup returns the closest entry at or before lsn.
func (x *lsnIndex) lookup(lsn uint64) idxEnt {
	live := x.e[x.first:]
	lo, hi := 0, len(live)
	for lo < hi {
		m := (lo + hi) / 2
		if live[m].lsn <= lsn {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo == 0 {
		return live[0]
	}
	return live[lo-1]
}

// lookupPos returns the last entry whose position is <= pos.
func (x *lsnIndex) lookupPos(pos uint64) idxEnt {
	live := x.e[x.first:]
	lo, hi := 0, len(live)
	for lo < hi {
		m := (lo + hi) / 2
		if live[m].pos <= pos {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo == 0 {
		return live[0]
	}
	return live[lo-1]
}

// trim drops entries before the new tail and records the tail itself.
func (x *lsnIndex) trim(lsn, pos uint64) {
	live := x.e[x.first:]
	k := 0
	for k < len(live) && live[k].lsn <= lsn {
		k++
	}
	if k == 0 {
		// The tail is before every entry: cannot happen (the tail only
		// moves forward), keep the index as it is.
		return
	}
	x.first += k - 1
	x.e[x.first] = idxEnt{lsn, pos}
	if x.first > 1024 && x.first > len(x.e)/2 {
		n := copy(x.e, x.e[x.first:])
		x.e = x.e[:n]
		x.first = 0
	}
}

// batchMax bounds the log bytes one appendBatch writes with one pwrite
// (its buffer stays in bufPool).
const batchMax = pooledMax

// batchRes is one record's reservation in appendBatch.
type batchRes struct {
	start, resStart uint64
	gap             int64
}

// appendBatch appends records with fixed LSNs and epochs (the replica),
// recs[0].LSN being the next LSN and the rest consecutive, in one
// reservation under appendMu and as few pwrites as their log positions
// allow (one, unless the ring wraps inside the batch): the dirty map, the
// zero set and the completion are updated after the data is written, as
// appendRecord does for one record. Only Write, Zero and Barrier records
// come here, each at most pooledMax bytes of payload.
//
// It reserves without waiting: the records that fit in the log now are
// appended and their number returned; the first that does not fit is left
// for the next call. When not even the first fits it is appended on its
// own by appendRecord, which waits (bounded) for the flusher to make room.
// A failed write fails the volume (as appendRecord does): what a crash
// leaves of a torn batch is a prefix of whole records, the rest failing
// its CRC at recovery, and nothing of it is reported durable before the
// WAL's fdatasync.
func (v *Volume) appendBatch(recs []wal.Record, res []batchRes) (int, error) {
	v.appendMu.Lock()
	if err := v.failErr(); err != nil {
		v.appendMu.Unlock()
		return 0, err
	}
	if recs[0].LSN != v.nextLSN {
		want := v.nextLSN
		v.appendMu.Unlock()
		return 0, fmt.Errorf("apply record LSN %d, expected %d: %w", recs[0].LSN, want, blockdev.ErrInvalid)
	}
	n, bytes := 0, 0
	for n < len(recs) {
		rec := &recs[n]
		size := rec.Size()
		if n > 0 && bytes+size > batchMax || int64(size) > v.walSize/2 {
			// Too large for this WAL: appendRecord refuses it, as it
			// does one record at a time.
			break
		}
		start, gap := v.ring.Place(v.head, size)
		if start+uint64(size)-v.tailPos.Load() > uint64(v.walSize) || v.nextLSN-v.comp.doneRelaxed() >= compWindow-1 {
			break
		}
		rec.Gen = v.gen
		res[n] = batchRes{start: start, resStart: v.head, gap: gap}
		v.nextLSN++
		v.head = start + uint64(size)
		v.index.add(rec.LSN, res[n].resStart)
		if v.feed != nil {
			v.feed.push(*rec)
		}
		bytes += size + int(gap)
		n++
	}
	if n == 0 {
		v.appendMu.Unlock()
		if _, err := v.appendRecord(recs[0], true); err != nil {
			return 0, err
		}
		return 1, nil
	}
	v.headLSN.Store(recs[n-1].LSN)
	used := v.head - v.ckptPos.Load()
	v.appendMu.Unlock()
	if used >= flushHighWater(v.walSize) {
		v.kick()
	}
	if w, err := v.writeBatch(recs[:n], res[:n]); err != nil {
		// The first w records were written (a crash may keep them) but
		// are not complete: the volume stops here.
		v.fail(err)
		return w, ioError(fmt.Errorf("append LSNs %d-%d: %w", recs[0].LSN+uint64(w), recs[n-1].LSN, err))
	}
	for i := range recs[:n] {
		rec, start := &recs[i], res[i].start
		if v.trace != nil {
			v.trace("append lsn=%d gen=%d %s blk=%d n=%d start=%d", rec.LSN, rec.Gen, rec.Type, rec.Offset>>v.bshift, rec.Length>>v.bshift, start)
		}
		switch rec.Type {
		case wal.Write:
			v.dirty.putRange(uint64(rec.Offset)>>v.bshift, uint64(rec.Length)>>v.bshift, start+wal.HeaderSize, uint64(v.bs))
		case wal.Zero:
			v.zeros.add(uint64(rec.Offset)>>v.bshift, uint64(rec.Offset+int64(rec.Length))>>v.bshift, start)
		}
	}
	v.comp.markDoneRun(recs[0].LSN, n, func(i int) uint64 { return res[i].start + uint64(recs[i].Size()) })
	return n, nil
}

// writeBatch writes the reserved records: each run of records that lie
// back to back in the file goes out in one pwrite; a record placed after
// the ring's end gets its padding header first, as in writeRecord. On an
// error it returns how many records were written before it.
func (v *Volume) writeBatch(recs []wal.Record, res []batchRes) (int, error) {
	for i := 0; i < len(recs); {
		if res[i].gap >= wal.HeaderSize {
			var hdr [wal.HeaderSize]byte
			wal.PutHeader(hdr[:], wal.Record{Type: wal.Padding, LSN: recs[i].LSN, Gen: recs[i].Gen, Length: uint32(res[i].gap - wal.HeaderSize)}, nil)
			if _, err := v.walF.WriteAt(hdr[:], v.ring.Phys(res[i].resStart)); err != nil {
				return i, err
			}
		}
		phys := v.ring.Phys(res[i].start)
		total := recs[i].Size()
		j := i + 1
		for j < len(recs) && res[j].gap == 0 && v.ring.Phys(res[j].start) == phys+int64(total) {
			total += recs[j].Size()
			j++
		}
		bp := getBuf(total)
		buf := *bp
		o := 0
		for k := i; k < j; k++ {
			o += wal.EncodeInto(buf[o:], recs[k])
		}
		_, err := v.walF.WriteAt(buf, phys)
		putBuf(bp)
		if err != nil {
			return i, err
		}
		i = j
	}
	return len(recs), nil
}

// markDoneRun marks n consecutive records from LSN first complete, record
// i ending at end(i), under one lock.
func (c *completion) markDoneRun(first uint64, n int, end func(int) uint64) {
	c.mu.Lock()
	for i := 0; i < n; i++ {
		c.completeLocked(first+uint64(i), end(i))
	}
	c.doneA.Store(c.done)
	c.cond.Broadcast()
	c.mu.Unlock()
}
