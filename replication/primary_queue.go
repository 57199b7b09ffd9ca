package replication

// Live shipping: records from the volume's record feed are encoded once
// into a refcounted item shared by every replica queue.

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/wal"
)

// item is one record encoded for the wire, shared by every replica queue
// it is put on; its buffer returns to a pool when the last one let go.
type item struct {
	lsn  uint64
	body []byte
	refs atomic.Int32
	buf  *[]byte // pooled backing store, nil if not pooled
}

const (
	// recordBodyHeader is the encoded size of a RecordBody without its
	// data: type (1), epoch (8), offset (8), length (4).
	recordBodyHeader = 1 + 8 + 8 + 4
	// pooledBodyCap is the capacity of a pooled record body: a 4 KiB
	// write (the common case) plus its header, rounded up. Larger bodies
	// are allocated.
	pooledBodyCap = 4096 + 64
)

var bodyPool = sync.Pool{New: func() any { b := make([]byte, 0, pooledBodyCap); return &b }}

func (it *item) release() {
	if it.refs.Add(-1) == 0 && it.buf != nil {
		*it.buf = it.body[:0]
		bodyPool.Put(it.buf)
		it.buf, it.body = nil, nil
	}
}

func releaseAll(items []*item) {
	for _, it := range items {
		it.release()
	}
}

// Shipping takes the volume's record feed and, from replication's own
// goroutines (no lock of the engine held), marks the dirty-region bitmaps
// and puts each record on every replica queue. The writer that appended
// a record ships it right after its write returns (pumpSoon), a flush
// ships before it asks for barriers (pump), and the shipper goroutine is
// the backstop for a record a concurrent pump left behind.

// shipBackstop paces the shipper goroutine.
const shipBackstop = 5 * time.Millisecond

func (p *Primary) ship() {
	defer p.wg.Done()
	t := time.NewTicker(shipBackstop)
	defer t.Stop()
	for {
		select {
		case <-p.stopCh:
			return
		case <-t.C:
		}
		p.pumpSoon()
	}
}

// pump ships everything the feed holds now, waiting for a concurrent pump.
func (p *Primary) pump() {
	p.shipMu.Lock()
	p.pumpReq.Store(false)
	p.pumpLocked()
	p.shipMu.Unlock()
}

// pumpSoon ships what the feed holds unless another pump is running; that
// one then runs once more (pumpReq), so nothing pushed before this call
// is left behind.
func (p *Primary) pumpSoon() {
	p.pumpReq.Store(true)
	for p.pumpReq.Load() && p.shipMu.TryLock() {
		p.pumpReq.Store(false)
		p.pumpLocked()
		p.shipMu.Unlock()
	}
}

func (p *Primary) pumpLocked() {
	var lost blockvol.Lost
	p.shipRecs, lost = p.feed.Take(p.shipRecs[:0])
	if len(p.shipRecs) > 0 {
		var stop int
		p.shipItems, stop = p.shipBatch(p.shipRecs, p.shipItems[:0])
		if stop < len(p.shipRecs) {
			// Records taken without their data (pushed while there was
			// no replica) go to a replica listed since as a lost range,
			// with everything after them: it catches up from the WAL.
			lost = blockvol.Lost{From: p.shipRecs[stop].LSN, To: max(lost.To, p.shipRecs[len(p.shipRecs)-1].LSN)}
		}
		p.feed.Recycle(p.shipRecs)
	}
	if lost.From != 0 {
		p.feedLost(lost)
	}
}

// shipBatch marks and queues recs (in LSN order) and returns items for
// reuse, and the index of the first record it did not ship: one without
// its data (blockvol.Elided) while there are replicas to ship to, decided
// on the same list of replicas it ships to (len(recs) when all went).
func (p *Primary) shipBatch(recs []wal.Record, items []*item) ([]*item, int) {
	var bytes int64
	p.smu.Lock()
	reps := p.shipReps
	stop := len(recs)
	for i, rec := range recs {
		if rec.Type == wal.Padding {
			continue
		}
		if len(reps) > 0 && blockvol.Elided(rec) {
			stop = i
			break
		}
		bytes += int64(recordBodyHeader + len(rec.Payload))
		p.lastLSN = rec.LSN
		if len(reps) == 0 {
			continue
		}
		if rec.Type == wal.Write || rec.Type == wal.Zero {
			for _, r := range reps {
				r.bm.mark(rec.Offset, int64(rec.Length))
			}
		}
		it := &item{lsn: rec.LSN}
		n := recordBodyHeader + len(rec.Payload)
		if n <= pooledBodyCap {
			it.buf = bodyPool.Get().(*[]byte)
			it.body = (*it.buf)[:0]
		} else {
			it.body = make([]byte, 0, n)
		}
		it.body = RecordBody{Type: uint8(rec.Type), Epoch: rec.Epoch, Offset: rec.Offset, Length: rec.Length, Data: rec.Payload}.Encode(it.body)
		it.refs.Store(int32(len(reps)) + 1) // +1: the shipper's own reference
		items = append(items, it)
	}
	p.smu.Unlock()
	p.cumBytes.Add(bytes)
	for _, r := range reps {
		r.enqueue(items, p.cfg.MaxQueueBytes)
	}
	releaseAll(items) // the shipper's own references
	clear(items)
	return items, stop
}

// feedLost handles records the feed dropped because the shipper fell
// behind its bound: the bitmaps no longer cover those records, so each is
// restarted after them (a replica behind them is rebuilt, not resynced
// from an incomplete bitmap); live sessions see the gap in their queue
// and catch up from the WAL.
func (p *Primary) feedLost(lost blockvol.Lost) {
	p.log.Warn(EvFeedLost, "from_lsn", lost.From, "to_lsn", lost.To)
	p.smu.Lock()
	p.lastLSN = lost.To
	for _, r := range p.shipReps {
		r.bm = newDirtyBitmap(p.cfg.RegionSize, p.vol.Size(), lost.To+1)
	}
	p.smu.Unlock()
}

// enqueue puts items (consecutive LSNs) on r's queue, taking one
// reference of each, or lets the references go.
func (r *replica) enqueue(items []*item, limit int64) {
	if len(items) == 0 {
		return
	}
	r.qmu.Lock()
	if !r.attached {
		r.qmu.Unlock()
		releaseAll(items)
		return
	}
	var dropped []*item
	for i, it := range items {
		if r.qbytes+int64(len(it.body)) > limit {
			r.attached, r.overflow = false, true
			r.live.Store(false)
			dropped = append(r.queue, items[i:]...)
			r.queue, r.qbytes = nil, 0
			break
		}
		r.queue = append(r.queue, it)
		r.qbytes += int64(len(it.body))
	}
	if r.waiting {
		r.qcond.Signal()
	}
	r.qmu.Unlock()
	releaseAll(dropped)
}

func (r *replica) attach() {
	r.qmu.Lock()
	r.attached, r.overflow = true, false
	old := r.queue
	r.queue, r.qbytes = nil, 0
	r.live.Store(true)
	r.qmu.Unlock()
	releaseAll(old)
}

func (r *replica) detach() {
	r.qmu.Lock()
	r.attached = false
	r.live.Store(false)
	old := r.queue
	r.queue, r.qbytes = nil, 0
	r.qcond.Broadcast()
	r.qmu.Unlock()
	releaseAll(old)
}
