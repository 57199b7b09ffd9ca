package blockvol

import (
	"math/bits"
	"sort"
	"sync"
	"sync/atomic"
)

// dirtyMap maps a block number to where its newest data not yet in the
// extent lies in the WAL (logical position), in maps sharded by groups of
// 16 blocks so that concurrent writers rarely share a lock and a
// multi-block write takes few.
//
// Each entry also remembers the oldest of its versions that the extent
// does not reflect yet (old; 0 when the newest is the only one). The
// flusher must write a block whose older version lies inside the batch it
// checkpoints even when the newest version lies beyond it: once the
// checkpoint passes the older version only the extent can keep it (or
// something newer), as the record of the newest may still be lost.
type dirtyMap struct {
	shards [dirtyShards]dirtyShard
	n      atomic.Int64
}

type dval struct {
	pos uint64 // newest version's data
	old uint64 // oldest version not in the extent, if older than pos
}

const (
	dirtyShards     = 64
	dirtyGroupShift = 4
)

type dirtyShard struct {
	mu sync.RWMutex
	m  map[uint64]dval
	_  [40]byte // keep shards on separate cache lines
}

func (d *dirtyMap) init() {
	for i := range d.shards {
		d.shards[i].m = make(map[uint64]dval)
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
			switch {
			case !ok:
				added++
				s.m[b] = dval{pos: p}
			case old.pos < p:
				o := old.old
				if o == 0 {
					o = old.pos
				}
				s.m[b] = dval{pos: p, old: o}
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
	return p.pos, ok
}

func (d *dirtyMap) len() int64 { return d.n.Load() }

// dirtyEnt is a collected entry: the newest position at collection time.
type dirtyEnt struct{ block, pos uint64 }

// collect appends, sorted by block, the entries with a version before
// position before whose newest version lies before durEnd, and returns
// the lowest older version before position before of an entry whose
// newest lies at or after durEnd (^0: none).
func (d *dirtyMap) collect(dst []dirtyEnt, before, durEnd uint64) ([]dirtyEnt, uint64) {
	cut := ^uint64(0)
	for i := range d.shards {
		s := &d.shards[i]
		s.mu.RLock()
		for b, v := range s.m {
			if !(v.pos < before || (v.old != 0 && v.old < before)) {
				continue
			}
			if v.pos < durEnd {
				dst = append(dst, dirtyEnt{b, v.pos})
			} else if v.old != 0 && v.old < cut {
				cut = v.old
			}
		}
		s.mu.RUnlock()
	}
	sort.Slice(dst, func(i, j int) bool { return dst[i].block < dst[j].block })
	return dst, cut
}

// removeOlder deletes the entries of blocks [first, end) whose newest
// version lies before pos (recovery: a redirected write superseded them).
func (d *dirtyMap) removeOlder(first, end, pos uint64) {
	if d.n.Load() == 0 {
		return
	}
	var removed int64
	for b := first; b < end; b++ {
		s := d.shard(b)
		s.mu.Lock()
		if v, ok := s.m[b]; ok && v.pos < pos {
			delete(s.m, b)
			removed++
		}
		s.mu.Unlock()
	}
	d.n.Add(-removed)
}

// removeFn deletes the entries for which drop is true.
func (d *dirtyMap) removeFn(drop func(block, pos uint64) bool) {
	var removed int64
	for i := range d.shards {
		s := &d.shards[i]
		s.mu.Lock()
		for b, v := range s.m {
			if drop(b, v.pos) {
				delete(s.m, b)
				removed++
			}
		}
		s.mu.Unlock()
	}
	d.n.Add(-removed)
}

// flushed records that the collected versions are in the extent: entries
// still at that version are deleted; entries replaced meanwhile now only
// have versions after it unflushed.
func (d *dirtyMap) flushed(ents []dirtyEnt) {
	var removed int64
	for i := 0; i < len(ents); {
		s := d.shard(ents[i].block)
		s.mu.Lock()
		for ; i < len(ents) && d.shard(ents[i].block) == s; i++ {
			e := ents[i]
			v, ok := s.m[e.block]
			switch {
			case !ok:
			case v.pos == e.pos:
				delete(s.m, e.block)
				removed++
			case v.old != 0 && v.old <= e.pos:
				// Versions up to e.pos are in the extent; e.pos is
				// before the next one, so it bounds it from below.
				v.old = e.pos
				s.m[e.block] = v
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

// overlaps reports whether any range touches blocks [start, end).
func (z *zeroSet) overlaps(start, end uint64) bool {
	z.mu.RLock()
	defer z.mu.RUnlock()
	for _, r := range z.r {
		if r.start < end && start < r.end {
			return true
		}
	}
	return false
}

// carve removes blocks [start, end) from every range older than pos
// (recovery: a redirected write there superseded them), splitting ranges
// that cover more.
func (z *zeroSet) carve(start, end, pos uint64) {
	z.mu.Lock()
	defer z.mu.Unlock()
	var out []zeroRange
	for _, r := range z.r {
		if r.pos >= pos || r.end <= start || end <= r.start {
			out = append(out, r)
			continue
		}
		if r.start < start {
			out = append(out, zeroRange{r.start, start, r.pos})
		}
		if end < r.end {
			out = append(out, zeroRange{end, r.end, r.pos})
		}
	}
	z.r = out
	z.n.Store(int32(len(z.r)))
}

func (z *zeroSet) collect() []zeroRange { return z.collectBelow(^uint64(0)) }

// collectBelow returns the ranges whose record lies before position end.
func (z *zeroSet) collectBelow(end uint64) []zeroRange {
	z.mu.RLock()
	defer z.mu.RUnlock()
	var out []zeroRange
	for _, r := range z.r {
		if r.pos < end {
			out = append(out, r)
		}
	}
	return out
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

// tryLockStripes locks the stripes of blocks [first, first+n) if none is
// held, without waiting (the flusher must never wait for a writer).
func (v *Volume) tryLockStripes(first, n uint64) bool {
	var got []*stripe
	ok := true
	v.forStripes(first, n, func(s *stripe) {
		if ok && s.TryLock() {
			got = append(got, s)
		} else {
			ok = false
		}
	})
	if !ok {
		for _, s := range got {
			s.Unlock()
		}
	}
	return ok
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

// stripeSet is a set of stripes, locked together in ascending order (the
// lock order of forStripes) by a batch that touches many blocks.
type stripeSet [nStripes / 64]uint64

func (s *stripeSet) add(first, n uint64) {
	if n >= nStripes {
		for i := range s {
			s[i] = ^uint64(0)
		}
		return
	}
	for b := first; b < first+n; b++ {
		i := b % nStripes
		s[i/64] |= 1 << (i % 64)
	}
}

func (v *Volume) lockStripeSet(s *stripeSet) {
	for w, bits := range s {
		for ; bits != 0; bits &= bits - 1 {
			v.stripes[w*64+bits0(bits)].Lock()
		}
	}
}

func (v *Volume) unlockStripeSet(s *stripeSet) {
	for w, bits := range s {
		for ; bits != 0; bits &= bits - 1 {
			v.stripes[w*64+bits0(bits)].Unlock()
		}
	}
}

func bits0(x uint64) int { return bits.TrailingZeros64(x) }

// collectAll is every entry, sorted by block.
func collectAll(d *dirtyMap) []dirtyEnt {
	ents, _ := d.collect(nil, ^uint64(0), ^uint64(0))
	return ents
}
