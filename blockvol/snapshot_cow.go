package blockvol

import (
	"fmt"
	"slices"
)

// cowTargets are the snapshots a flush preserves blocks in: the newest,
// and the one before it while the newest is being deleted (merged).
func (v *Volume) cowTargets() []*snapshot {
	v.snaps.mu.RLock()
	defer v.snaps.mu.RUnlock()
	l := v.snaps.list
	switch n := len(l); {
	case n == 0:
		return nil
	case n >= 2 && l[n-1].merged.Load():
		return []*snapshot{l[n-1], l[n-2]}
	default:
		return l[n-1:]
	}
}

// cowBeforeFlush preserves, in the newest snapshot (see cowTargets), the
// extent content of every block a flush of ents and zr is about to
// overwrite or punch and that the snapshot does not hold yet. It returns
// once the pre-images are durable. Called by applyToExtent (under
// flushMu, or in recovery).
func (v *Volume) cowBeforeFlush(ents []dirtyEnt, zr []zeroRange) error {
	for _, s := range v.cowTargets() {
		if err := v.cowInto(s, ents, zr); err != nil {
			return err
		}
	}
	return nil
}

func (v *Volume) cowInto(s *snapshot, ents []dirtyEnt, zr []zeroRange) error {
	limit := uint64(s.info.SizeBytes) >> v.bshift
	var blocks []uint64
	for _, e := range ents {
		if e.block < limit && !superseded(zr, e) && !s.has(e.block) {
			blocks = append(blocks, e.block)
		}
	}
	for _, z := range zr {
		bs, err := v.allocatedBlocks(z.start, min(z.end, limit))
		if err != nil {
			return err
		}
		for _, b := range bs {
			if !s.has(b) {
				blocks = append(blocks, b)
			}
		}
	}
	return v.preserve(s, blocks)
}

// cowRange is cowBeforeFlush for a base write of [off, off+n) straight
// into the extent (ReplWriteBase, ReplZeroBase). The caller holds flushMu.
func (v *Volume) cowRange(off, n int64, punch bool) error {
	for _, s := range v.cowTargets() {
		if err := v.cowRangeInto(s, off, n, punch); err != nil {
			return err
		}
	}
	return nil
}

func (v *Volume) cowRangeInto(s *snapshot, off, n int64, punch bool) error {
	limit := uint64(s.info.SizeBytes) >> v.bshift
	first, end := uint64(off)>>v.bshift, min(uint64(off+n+v.bs-1)>>v.bshift, limit)
	var blocks []uint64
	if punch {
		var err error
		if blocks, err = v.allocatedBlocks(first, end); err != nil {
			return err
		}
	} else {
		for b := first; b < end; b++ {
			blocks = append(blocks, b)
		}
	}
	blocks = slices.DeleteFunc(blocks, s.has)
	return v.preserve(s, blocks)
}

// allocatedBlocks lists the blocks of [start, end) that have data in the
// extent (a hole reads as zeroes before and after a punch: nothing to
// preserve).
func (v *Volume) allocatedBlocks(start, end uint64) ([]uint64, error) {
	if start >= end {
		return nil, nil
	}
	off, n := int64(start)<<v.bshift, int64(end-start)<<v.bshift
	if sz := v.size.Load(); off+n > sz {
		n = sz - off
		if n <= 0 {
			return nil, nil
		}
	}
	rs, err := v.allocatedData(off, n)
	if err != nil {
		return nil, fmt.Errorf("snapshot copy-on-write: extent allocation: %w", err)
	}
	var out []uint64
	for _, r := range rs {
		for b := uint64(r.Off) >> v.bshift; b < uint64(r.Off+r.Len+v.bs-1)>>v.bshift && b < end; b++ {
			if b >= start {
				out = append(out, b)
			}
		}
	}
	return out, nil
}

// preserve copies the extent content of blocks into s (durably), in
// batches of at most preserveBatch blocks (one fdatasync each).
func (v *Volume) preserve(s *snapshot, blocks []uint64) error {
	if len(blocks) == 0 {
		return nil
	}
	slices.Sort(blocks)
	blocks = slices.Compact(blocks)
	bs := v.bs
	n := min(len(blocks), preserveBatch)
	buf := make([]byte, int64(n)*bs)
	ents := make([]snapEnt, 0, n)
	for len(blocks) > 0 {
		batch := blocks[:min(len(blocks), preserveBatch)]
		blocks = blocks[len(batch):]
		ents = ents[:0]
		for i := 0; i < len(batch); {
			j := i + 1
			for j < len(batch) && batch[j] == batch[j-1]+1 {
				j++
			}
			p := buf[int64(i)*bs : int64(j)*bs]
			if err := v.readExtent(p, int64(batch[i])<<v.bshift); err != nil {
				return fmt.Errorf("snapshot copy-on-write: %w", err)
			}
			for k := i; k < j; k++ {
				ents = append(ents, snapEnt{block: batch[k], data: buf[int64(k)*bs : int64(k+1)*bs]})
			}
			i = j
		}
		if err := v.appendSnapEntries(s, ents); err != nil {
			return fmt.Errorf("snapshot copy-on-write: %w", err)
		}
	}
	return nil
}

// preserveBatch bounds the pre-images copied per fdatasync (8 MiB of
// 4 KiB blocks).
const preserveBatch = 2048
