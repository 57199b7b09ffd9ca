package blockvol

import (
	"errors"
	"fmt"
	"sync"

	"github.com/blockd/blockd/wal"
)

// RecordFeed hands every record appended to the volume, in LSN order, to
// one subscriber (replication's shipper) without running the subscriber's
// code under the volume's locks: the append path copies the record into
// the feed under the feed's own lock (a leaf) and signals Ready; the
// subscriber takes what has gathered from its own goroutine.
//
// The feed is bounded (feedMaxBytes of payload). A subscriber that falls
// that far behind loses records: Take reports the lost LSN range once, and
// the subscriber must treat what it derives from the feed as incomplete
// for that range (the records themselves are still in the WAL while a
// retention hold keeps them).
type RecordFeed struct {
	v     *Volume
	ready chan struct{}

	mu       sync.Mutex
	recs     []wal.Record
	bytes    int64
	max      int64
	lostFrom uint64 // first LSN lost since the last Take (0: none)
	lostTo   uint64
	closed   bool
	noData   bool // SetPayloads(false)
}

// feedMaxBytes bounds the payload gathered in a feed between two Takes.
const feedMaxBytes = 256 << 20

// ErrFeedBusy: the volume already has a record subscriber.
var ErrFeedBusy = errors.New("blockvol: the volume already has a record feed")

// Lost is a range of LSNs a feed dropped (From == 0: none).
type Lost struct{ From, To uint64 }

// SubscribeRecords starts a feed of every record appended from now on.
// A volume has at most one feed; Close ends it.
func (v *Volume) SubscribeRecords() (*RecordFeed, error) {
	f := &RecordFeed{v: v, ready: make(chan struct{}, 1), max: feedMaxBytes}
	v.appendMu.Lock()
	defer v.appendMu.Unlock()
	if v.feed != nil {
		return nil, fmt.Errorf("blockvol: subscribe records in %s: %w", v.dir, ErrFeedBusy)
	}
	v.feed = f
	return f, nil
}

// SetPayloads says whether the subscriber needs the records' payloads.
// Without (a primary with no replica to ship to), push keeps a record's
// header only and copies no data: a record whose payload is shorter than
// its Length (Elided) was pushed so, and cannot be shipped.
func (f *RecordFeed) SetPayloads(want bool) {
	f.mu.Lock()
	f.noData = !want
	f.mu.Unlock()
}

// Elided reports whether rec came out of a feed without its payload
// (SetPayloads(false)).
func Elided(rec wal.Record) bool { return wal.HasData(rec.Type) && len(rec.Payload) != int(rec.Length) }

// Ready is signalled (buffered, one token) when records were added.
func (f *RecordFeed) Ready() <-chan struct{} { return f.ready }

// Take returns the records gathered since the last Take, appended to dst,
// and the LSN range lost in between, if any. The payloads belong to the
// caller until it passes them to Recycle.
func (f *RecordFeed) Take(dst []wal.Record) ([]wal.Record, Lost) {
	f.mu.Lock()
	defer f.mu.Unlock()
	dst = append(dst, f.recs...)
	clear(f.recs)
	f.recs = f.recs[:0]
	f.bytes = 0
	lost := Lost{f.lostFrom, f.lostTo}
	f.lostFrom, f.lostTo = 0, 0
	return dst, lost
}

// Recycle returns the payload buffers of records from Take.
func (f *RecordFeed) Recycle(recs []wal.Record) {
	for i := range recs {
		if p := recs[i].Payload; cap(p) > 0 {
			putBuf(&p)
		}
		recs[i].Payload = nil
	}
}

// Close ends the feed; the volume takes a new subscriber afterwards.
func (f *RecordFeed) Close() {
	f.v.appendMu.Lock()
	if f.v.feed == f {
		f.v.feed = nil
	}
	f.v.appendMu.Unlock()
	f.mu.Lock()
	f.closed = true
	f.Recycle(f.recs)
	f.recs = nil
	f.mu.Unlock()
}

// push is called by the append path under appendMu, in LSN order. It
// copies rec's payload and never blocks.
func (f *RecordFeed) push(rec wal.Record) {
	n := int64(len(rec.Payload))
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	if f.noData && rec.Type == wal.Write {
		n = 0
		rec.Payload = rec.Payload[:0:0]
	}
	// Once a record is lost every later one is too, until the next Take:
	// what Take returns is always contiguous, then the lost range.
	if f.lostFrom != 0 || (f.bytes+n > f.max && len(f.recs) > 0) {
		if f.lostFrom == 0 {
			f.lostFrom = rec.LSN
		}
		f.lostTo = rec.LSN
		f.mu.Unlock()
		return
	}
	if n > 0 {
		bp := getBuf(int(n))
		copy(*bp, rec.Payload)
		rec.Payload = *bp
	} else {
		rec.Payload = nil
	}
	f.recs = append(f.recs, rec)
	f.bytes += n
	f.mu.Unlock()
	select {
	case f.ready <- struct{}{}:
	default:
	}
}
