package blockvol

import (
	"sort"
	"sync"
	"sync/atomic"
)

// dirtyMap maps a block number to the logical WAL position of its newest
// data not yet in the extent. One uint64 key and one uint64 value per
// dirty block, in maps sharded by groups of 16 blocks so that concurrent
// writers rarely share a lock and a multi-block write takes few.
//
// Bit 0 of a value (positions are 8-aligned) is the replaced flag: the
// block had an older unflushed version. The flusher must then write the
// block even when its newest version lies beyond the batch it
// checkpoints: the map no longer holds the older version, and once the
// checkpoint passes it, only the extent can keep it (or something newer).
type dirtyMap struct {
	shards [dirtyShards]dirtyShard
	n      atomic.Int64
}

const replacedFlag = 1

func posOfVal(v uint64) uint64 { return v &^ replacedFlag }

const (
	dirtyShards     = 64
	dirtyGroupShift = 4
)

type dirtyShard struct {
	mu sync.RWMutex
	m  map[uint64]uint64
	_  [40]byte // keep shards on separate cache lines
}

func (d *dirtyMap) init() {
	for i := range d.shards {
		d.shards[i].m = make(map[uint64]uint64)
	}
}

func (d *dirtyMap) shard(b uint64) *dirtyShard {
	return &d.shards[(b>>dirtyGroupShift)%dirtyShards]
}

// putRange records n consecutive blocks from block first whose data starts
// at pos, bs bytes apart. An entry is only replaced by a newer position.
func (d *dirtyMap) putRange(first, n, pos, bs uint64) {
	var added int64
	for i := uint64(0); i < n; {
		b := first + i
		s := d.shard(b)
		end := (b | (1<<dirtyGroupShift - 1)) + 1 // end of this shard group
		if end > first+n {
			end = first + n
		}
		s.mu.Lock()
		for ; b < end; b, i = b+1, i+1 {
			p := pos + i*bs
			old, ok := s.m[b]
			if !ok {
				added++
				s.m[b] = p
			} else if posOfVal(old) < p {
				s.m[b] = p | replacedFlag
			}
		}
		s.mu.Unlock()
	}
	d.n.Add(added)
}

func (d *dirtyMap) get(b uint64) (uint64, bool) {
	s := d.shard(b)
	s.mu.RLock()
	p, ok := s.m[b]
	s.mu.RUnlock()
	return posOfVal(p), ok
}

func (d *dirtyMap) len() int64 { return d.n.Load() }

// dirtyEnt is a collected entry; val is the map value (position and
// replaced flag).
type dirtyEnt struct{ block, val uint64 }

func (e dirtyEnt) pos() uint64 { return posOfVal(e.val) }

// collect appends, sorted by block, the entries with position < before
// and the replaced ones.
func (d *dirtyMap) collect(dst []dirtyEnt, before uint64) []dirtyEnt {
	dst = d.collectFn(dst, func(_, val uint64) bool {
		return posOfVal(val) < before || val&replacedFlag != 0
	})
	sort.Slice(dst, func(i, j int) bool { return dst[i].block < dst[j].block })
	return dst
}

// collectFn appends the entries for which keep is true, unsorted.
func (d *dirtyMap) collectFn(dst []dirtyEnt, keep func(block, val uint64) bool) []dirtyEnt {
	for i := range d.shards {
		s := &d.shards[i]
		s.mu.RLock()
		for b, p := range s.m {
			if keep(b, p) {
				dst = append(dst, dirtyEnt{b, p})
			}
		}
		s.mu.RUnlock()
	}
	return dst
}

// removeFn deletes the entries for which drop is true.
func (d *dirtyMap) removeFn(drop func(block, val uint64) bool) {
	var removed int64
	for i := range d.shards {
		s := &d.shards[i]
		s.mu.Lock()
		for b, p := range s.m {
			if drop(b, p) {
				delete(s.m, b)
				removed++
			}
		}
		s.mu.Unlock()
	}
	d.n.Add(-removed)
}

// removeIf deletes the entries that still hold the given values.
func (d *dirtyMap) removeIf(ents []dirtyEnt) {
	var removed int64
	for i := 0; i < len(ents); {
		s := d.shard(ents[i].block)
		s.mu.Lock()
		for ; i < len(ents) && d.shard(ents[i].block) == s; i++ {
			e := ents[i]
			if p, ok := s.m[e.block]; ok && p == e.val {
				delete(s.m, e.block)
				removed++
			}
		}
		s.mu.Unlock()
	}
	d.n.Add(-removed)
}

// zeroSet holds the trims and write-zeroes not yet applied to the extent:
// block ranges with the log position of their record. A read of a block
// covered by a range newer than the block's dirty entry returns zeroes.
// It is usually empty or tiny; the flusher is nudged when it grows.
type zeroSet struct {
	mu sync.RWMutex
	r  []zeroRange
	n  atomic.Int32
}

type zeroRange struct{ start, end, pos uint64 }

func (z *zeroSet) add(start, end, pos uint64) {
	z.mu.Lock()
	z.r = append(z.r, zeroRange{start, end, pos})
	z.n.Store(int32(len(z.r)))
	z.mu.Unlock()
}

// cover returns the newest position of a range covering block b.
func (z *zeroSet) cover(b uint64) (uint64, bool) {
	if z.n.Load() == 0 {
		return 0, false
	}
	z.mu.RLock()
	var pos uint64
	ok := false
	for _, r := range z.r {
		if b >= r.start && b < r.end && (!ok || r.pos > pos) {
			pos, ok = r.pos, true
		}
	}
	z.mu.RUnlock()
	return pos, ok
}

func (z *zeroSet) collect() []zeroRange {
	z.mu.RLock()
	defer z.mu.RUnlock()
	return append([]zeroRange(nil), z.r...)
}

func (z *zeroSet) remove(done []zeroRange) {
	if len(done) == 0 {
		return
	}
	z.mu.Lock()
	keep := z.r[:0]
	for _, r := range z.r {
		gone := false
		for _, d := range done {
			if d == r {
				gone = true
				break
			}
		}
		if !gone {
			keep = append(keep, r)
		}
	}
	clear(z.r[len(keep):])
	z.r = keep
	z.n.Store(int32(len(z.r)))
	z.mu.Unlock()
}

// Stripe locks serialise writers of the same block, so a sub-block write's
// read-modify-write is atomic and the dirty map sees a block's writes in
// LSN order.
const nStripes = 1024

type stripe struct {
	sync.Mutex
}

func (v *Volume) lockStripes(first, n uint64) {
	v.forStripes(first, n, func(s *stripe) { s.Lock() })
}

func (v *Volume) unlockStripes(first, n uint64) {
	v.forStripes(first, n, func(s *stripe) { s.Unlock() })
}

// forStripes visits the stripes of blocks [first, first+n) once each, in
// ascending stripe order (the lock order).
func (v *Volume) forStripes(first, n uint64, fn func(*stripe)) {
	if n >= nStripes {
		for i := range v.stripes {
			fn(&v.stripes[i])
		}
		return
	}
	s := first % nStripes
	e := s + n
	if e <= nStripes {
		for i := s; i < e; i++ {
			fn(&v.stripes[i])
		}
		return
	}
	for i := uint64(0); i < e-nStripes; i++ {
		fn(&v.stripes[i])
	}
	for i := s; i < nStripes; i++ {
		fn(&v.stripes[i])
	}
}
