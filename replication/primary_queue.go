package replication

// Live shipping: the record sink (run by the engine for every appended
// record) encodes each record once into a refcounted item shared by every
// replica queue.

import (
	"sync"
	"sync/atomic"

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

func (p *Primary) sink(rec wal.Record) {
	if rec.Type == wal.Padding {
		return
	}
	p.cumBytes.Add(int64(recordBodyHeader + len(rec.Payload)))
	p.smu.Lock()
	defer p.smu.Unlock()
	p.lastLSN = rec.LSN
	reps := p.sinkReps
	if len(reps) == 0 {
		return
	}
	var it *item
	for _, r := range reps {
		if rec.Type == wal.Write || rec.Type == wal.Zero {
			r.bm.mark(rec.Offset, int64(rec.Length))
		}
		if it == nil {
			it = &item{lsn: rec.LSN}
			n := recordBodyHeader + len(rec.Payload)
			if n <= pooledBodyCap {
				it.buf = bodyPool.Get().(*[]byte)
				it.body = (*it.buf)[:0]
			} else {
				it.body = make([]byte, 0, n)
			}
			it.body = RecordBody{Type: uint8(rec.Type), Epoch: rec.Epoch, Offset: rec.Offset, Length: rec.Length, Data: rec.Payload}.Encode(it.body)
			it.refs.Store(int32(len(reps)) + 1) // +1: the sink's own reference
		}
		r.enqueue(it, p.cfg.MaxQueueBytes)
	}
	it.release() // the sink's own reference
}

// enqueue puts it on r's queue (taking one of its references) or lets
// the reference go.
func (r *replica) enqueue(it *item, limit int64) {
	r.qmu.Lock()
	if !r.attached {
		r.qmu.Unlock()
		it.release()
		return
	}
	var dropped []*item
	if r.qbytes+int64(len(it.body)) > limit {
		r.attached, r.overflow = false, true
		r.live.Store(false)
		dropped = append(r.queue, it)
		r.queue, r.qbytes = nil, 0
	} else {
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
