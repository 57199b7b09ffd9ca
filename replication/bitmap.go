package replication

import "sort"

// dirtyBitmap is the primary's per-replica record of which regions were
// written since some LSN. It keeps two generations: cur collects every
// record from cur.start on; prev (if any) from prev.start up to cur.start.
// Their union covers every record with LSN ≥ from(). When the replica's
// FlushedLSN passes cur.start, prev is no longer needed and the
// generations rotate, so the bitmap stays close to the replica's progress.
// All methods are called under Primary.smu.
type dirtyBitmap struct {
	regionSize int64
	n          int
	prev, cur  *bitGen
}

type bitGen struct {
	start uint64
	bits  []uint64
	count int
}

func newBitGen(start uint64, n int) *bitGen {
	return &bitGen{start: start, bits: make([]uint64, (n+63)/64)}
}

func newDirtyBitmap(regionSize, size int64, start uint64) *dirtyBitmap {
	n := int((size + regionSize - 1) / regionSize)
	return &dirtyBitmap{regionSize: regionSize, n: n, cur: newBitGen(start, n)}
}

func (b *dirtyBitmap) from() uint64 {
	if b.prev != nil {
		return b.prev.start
	}
	return b.cur.start
}

func (b *dirtyBitmap) mark(off, length int64) {
	if length <= 0 {
		return
	}
	first, last := off/b.regionSize, (off+length-1)/b.regionSize
	for i := first; i <= last && i < int64(b.n); i++ {
		w, bit := i/64, uint64(1)<<(i%64)
		if b.cur.bits[w]&bit == 0 {
			b.cur.bits[w] |= bit
			b.cur.count++
		}
	}
}

// rotate drops prev when the replica is durable past cur.start.
func (b *dirtyBitmap) rotate(flushed, nextLSN uint64) bool {
	if flushed+1 < b.cur.start {
		return false
	}
	b.prev = b.cur
	b.cur = newBitGen(nextLSN, b.n)
	if flushed+1 >= nextLSN {
		b.prev = nil // every record so far is durable on the replica
	}
	return true
}

// regions lists the marked regions of both generations, ascending.
func (b *dirtyBitmap) regions() []uint32 {
	var out []uint32
	for w := range b.cur.bits {
		x := b.cur.bits[w]
		if b.prev != nil {
			x |= b.prev.bits[w]
		}
		for x != 0 {
			i := w*64 + trailingZeros(x)
			out = append(out, uint32(i))
			x &= x - 1
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func trailingZeros(x uint64) int {
	n := 0
	for x&1 == 0 {
		x >>= 1
		n++
	}
	return n
}

// sectorSet marks 512-byte sectors written by live records during a base
// transfer on the replica: base data never overwrites them.
type sectorSet struct {
	bits []uint64
}

func newSectorSet(size int64) *sectorSet {
	n := (size + 511) / 512
	return &sectorSet{bits: make([]uint64, (n+63)/64)}
}

func (s *sectorSet) mark(off, length int64) {
	for sec := off / 512; sec < (off+length+511)/512; sec++ {
		if w := sec / 64; w >= 0 && w < int64(len(s.bits)) {
			s.bits[w] |= 1 << (sec % 64)
		}
	}
}

func (s *sectorSet) has(sec int64) bool {
	w := sec / 64
	return w >= 0 && w < int64(len(s.bits)) && s.bits[w]&(1<<(sec%64)) != 0
}

// freeRuns calls fn for each maximal run of unmarked sectors in [off, off+length).
func (s *sectorSet) freeRuns(off, length int64, fn func(off, length int64) error) error {
	start := int64(-1)
	end := (off + length) / 512
	for sec := off / 512; sec < end; sec++ {
		if s.has(sec) {
			if start >= 0 {
				if err := fn(start*512, (sec-start)*512); err != nil {
					return err
				}
				start = -1
			}
		} else if start < 0 {
			start = sec
		}
	}
	if start >= 0 {
		return fn(start*512, (end-start)*512)
	}
	return nil
}
