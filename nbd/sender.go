package nbd

import (
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// copyThreshold: reply data up to this size is copied into the coalescing
// buffer; larger data goes out as its own iovec (writev), uncopied.
const copyThreshold = 16 << 10

// flushDelay bounds how long a finished reply may wait for the requests
// still executing on its connection before it is written anyway.
const flushDelay = 200 * time.Microsecond

// sender coalesces replies from many goroutines into few write(2)s without
// a dedicated writer goroutine. A reply is written when no other request of
// the connection is still executing (the queue drained), or after
// flushDelay at the latest; the goroutine that writes ("flat combining")
// keeps writing whatever the others queued meanwhile until the queue is
// empty. busy counts requests dispatched and not yet answered: the reader
// increments it, every send decrements it.
type sender struct {
	nc    net.Conn
	busy  atomic.Int32
	timer *time.Timer
	armed bool

	mu       sync.Mutex
	arena    []byte      // small replies, appended
	segStart int         // start of the arena part not yet in q
	q        net.Buffers // pending segments, in order
	rel      []*[]byte   // pooled buffers referenced by q
	flushing bool
	err      error
	dead     atomic.Bool // a write failed: the peer is gone

	spareArena []byte
	spareQ     net.Buffers
	spareRel   []*[]byte
}

// stop releases the flush timer once the connection is finished.
func (s *sender) stop() {
	s.mu.Lock()
	if s.timer != nil {
		s.timer.Stop()
	}
	s.mu.Unlock()
}

// send queues hdr (copied) and data (copied when small; otherwise
// referenced until written, then pooled is returned to the pool) and
// makes sure they get written. pooled may be nil.
func (s *sender) send(hdr, data []byte, pooled *[]byte, deferred bool) {
	s.mu.Lock()
	if s.err != nil {
		s.busy.Add(-1)
		s.mu.Unlock()
		putBuf(pooled)
		return
	}
	s.arena = append(s.arena, hdr...)
	if len(data) <= copyThreshold {
		s.arena = append(s.arena, data...)
		putBuf(pooled)
	} else {
		s.q = append(s.q, s.arena[s.segStart:])
		s.segStart = len(s.arena)
		s.q = append(s.q, data)
		s.rel = append(s.rel, pooled)
	}
	left := s.busy.Add(-1)
	if s.flushing || deferred {
		// A flusher is writing and will take this too, or the reading
		// worker executed this request itself and flushes when its input
		// drains (flushDeferred).
		s.mu.Unlock()
		return
	}
	if left > 0 {
		// Others are still executing: let the last of them (or the
		// timer) write this reply together with theirs.
		if !s.armed {
			s.armed = true
			if s.timer == nil {
				s.timer = time.AfterFunc(flushDelay, s.timerFlush)
			} else {
				s.timer.Reset(flushDelay)
			}
		}
		s.mu.Unlock()
		return
	}
	s.flushLocked()
}

// flushDeferred writes whatever is queued unless a flush is under way.
func (s *sender) flushDeferred() {
	s.mu.Lock()
	if s.flushing || s.err != nil || (len(s.q) == 0 && s.segStart == len(s.arena)) {
		s.mu.Unlock()
		return
	}
	s.flushLocked()
}

func (s *sender) timerFlush() {
	s.mu.Lock()
	s.armed = false
	if s.flushing || s.err != nil {
		s.mu.Unlock()
		return
	}
	s.flushLocked()
}

// flushLocked writes everything queued, releasing s.mu while writing; it
// returns with s.mu released.
func (s *sender) flushLocked() {
	s.flushing = true
	for {
		if s.segStart < len(s.arena) {
			s.q = append(s.q, s.arena[s.segStart:])
		}
		if len(s.q) == 0 {
			break
		}
		q, rel, arena := s.q, s.rel, s.arena
		s.q, s.rel, s.arena, s.segStart = s.spareQ[:0], s.spareRel[:0], s.spareArena[:0], 0
		s.mu.Unlock()

		wq := q // WriteTo consumes its receiver
		_, err := wq.WriteTo(s.nc)
		for i, b := range rel {
			putBuf(b)
			rel[i] = nil
		}
		clear(q)

		s.mu.Lock()
		s.spareQ, s.spareRel = q[:0], rel[:0]
		if cap(arena) <= 4<<20 {
			s.spareArena = arena[:0]
		} else {
			s.spareArena = nil
		}
		if err != nil {
			s.err = err
			s.dead.Store(true)
			for _, b := range s.rel {
				putBuf(b)
			}
			s.q, s.rel, s.arena, s.segStart = nil, nil, nil, 0
			// The peer is gone or the socket broken: unblock the reader.
			s.nc.Close()
			break
		}
	}
	s.flushing = false
	s.mu.Unlock()
}

// Buffer pool: power-of-two classes from 4 KiB to 32 MiB.
const (
	minPoolShift = 12
	maxPoolShift = 25
)

var pools [maxPoolShift + 1]sync.Pool

func poolClass(n int) int {
	if n <= 1<<minPoolShift {
		return minPoolShift
	}
	return bits.Len(uint(n - 1))
}

// getBuf returns a buffer of length n from the pool.
func getBuf(n int) *[]byte {
	cl := poolClass(n)
	if cl > maxPoolShift {
		b := make([]byte, n)
		return &b
	}
	if v := pools[cl].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<cl)
	return &b
}

// putBuf returns a buffer obtained from getBuf; nil is ignored.
func putBuf(b *[]byte) {
	if b == nil {
		return
	}
	c := cap(*b)
	if c < 1<<minPoolShift || c > 1<<maxPoolShift || c&(c-1) != 0 {
		return
	}
	pools[bits.Len(uint(c))-1].Put(b)
}
