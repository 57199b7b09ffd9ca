package blockvol

import (
	"fmt"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

// begin validates a request and takes the shared I/O lock. The caller
// must call v.ioMu.RUnlock when it returns nil.
func (v *Volume) begin(op string, off, length, maxLen int64, write bool) error {
	if err := blockdev.CheckRange(v.size.Load(), off, length, maxLen); err != nil {
		return fmt.Errorf("blockvol: %s off=%d len=%d: %w", op, off, length, err)
	}
	v.ioMu.RLock()
	if v.closed.Load() {
		v.ioMu.RUnlock()
		return fmt.Errorf("blockvol: %s: %w", op, blockdev.ErrClosed)
	}
	if write {
		if err := v.failErr(); err != nil {
			v.ioMu.RUnlock()
			return fmt.Errorf("blockvol: %s: %w", op, err)
		}
	}
	return nil
}

// ReadAt reads len(p) bytes at off. Dirty blocks come from the WAL, the
// rest from the extent.
func (v *Volume) ReadAt(p []byte, off int64) error {
	if err := v.begin("read", off, int64(len(p)), blockdev.MaxIOSize, false); err != nil {
		return err
	}
	defer v.ioMu.RUnlock()
	if err := v.read(p, off); err != nil {
		return fmt.Errorf("blockvol: read off=%d len=%d: %w", off, len(p), ioError(err))
	}
	return nil
}

// read serves any 512-aligned range; partial blocks go through a scratch
// block.
func (v *Volume) read(p []byte, off int64) error {
	bs := v.bs
	if off&(bs-1) == 0 && int64(len(p))&(bs-1) == 0 {
		return v.readBlocks(p, uint64(off>>v.bshift))
	}
	bp := getBuf(int(bs))
	defer putBuf(bp)
	blk := *bp
	for len(p) > 0 {
		b := off >> v.bshift
		in := off - b<<v.bshift
		n := min(int64(len(p)), bs-in)
		if in == 0 && n == bs {
			// Whole blocks in the middle: read them straight into p.
			full := (int64(len(p)) / bs) * bs
			if err := v.readBlocks(p[:full], uint64(b)); err != nil {
				return err
			}
			p, off = p[full:], off+full
			continue
		}
		if err := v.readBlocks(blk, uint64(b)); err != nil {
			return err
		}
		copy(p[:n], blk[in:in+n])
		p, off = p[n:], off+n
	}
	return nil
}

// readBlocks reads whole blocks starting at block first into p.
func (v *Volume) readBlocks(p []byte, first uint64) error {
	bs := uint64(v.bs)
	n := uint64(len(p)) / bs
	if v.dirty.len() == 0 && v.zeros.n.Load() == 0 {
		return v.readExtent(p, int64(first)*int64(bs))
	}
	i := uint64(0)
	for i < n {
		src, pos := v.classify(first + i)
		// Extend the run while the next block has the same kind of
		// source and (for WAL data) the next position.
		j := i + 1
		for j < n {
			s2, p2 := v.classify(first + j)
			if s2 != src || (src == srcWAL && p2 != pos+(j-i)*bs) {
				break
			}
			j++
		}
		buf := p[i*bs : j*bs]
		switch src {
		case srcZero:
			clear(buf)
		case srcExtent:
			if err := v.readExtent(buf, int64(first+i)*int64(bs)); err != nil {
				return err
			}
		case srcWAL:
			if _, err := v.walF.ReadAt(buf, v.ring.Phys(pos)); err != nil {
				return fmt.Errorf("read WAL at %d: %w", pos, err)
			}
			if v.tailPos.Load() > pos {
				// The flusher moved the data to the extent and the
				// space may have been reused while we read: look again.
				continue
			}
		}
		i = j
	}
	return nil
}

const (
	srcExtent = iota
	srcWAL
	srcZero
)

// classify says where block b's current data is. Zero ranges are looked
// up before the dirty map: the flusher removes superseded dirty entries
// before the zero range that superseded them.
func (v *Volume) classify(b uint64) (int, uint64) {
	zpos, zok := v.zeros.cover(b)
	pos, ok := v.dirty.get(b)
	switch {
	case ok && (!zok || pos > zpos):
		return srcWAL, pos
	case zok:
		return srcZero, 0
	}
	return srcExtent, 0
}

// readExtent reads the volume's data files (each chunk from its slot:
// redirect.go), not the WAL.
func (v *Volume) readExtent(p []byte, off int64) error { return v.readData(p, off) }

// WriteAt writes p at off. It returns once the write is in the WAL (page
// cache) and visible to reads; with fua, once it is durable.
func (v *Volume) WriteAt(p []byte, off int64, fua bool) error {
	if err := v.begin("write", off, int64(len(p)), blockdev.MaxIOSize, true); err != nil {
		return err
	}
	defer v.ioMu.RUnlock()
	lsn, err := v.write(p, off)
	if err == nil && fua {
		err = v.syncWAL(lsn)
	}
	if err != nil {
		return fmt.Errorf("blockvol: write off=%d len=%d: %w", off, len(p), err)
	}
	return nil
}

func (v *Volume) write(p []byte, off int64) (uint64, error) {
	bs := v.bs
	first := uint64(off >> v.bshift)
	last := uint64((off + int64(len(p)) - 1) >> v.bshift)
	nb := last - first + 1
	v.lockStripes(first, nb)
	defer v.unlockStripes(first, nb)
	if v.redirectable(off, len(p)) {
		lsn, err := v.writeRedirect(p, off)
		if err == nil {
			v.stats.redirectWrites.Add(1)
			v.stats.redirectBytes.Add(uint64(len(p)))
		}
		return lsn, err
	}
	if err := v.settleRange(first, nb); err != nil {
		return 0, err
	}
	payload := p
	if off&(bs-1) != 0 || int64(len(p))&(bs-1) != 0 {
		// Read-modify-write of the partial edge blocks, under the
		// stripe locks so no other writer of these blocks interleaves.
		bp := getBuf(int(nb) * int(bs))
		defer putBuf(bp)
		buf := *bp
		if off&(bs-1) != 0 {
			if err := v.readBlocks(buf[:bs], first); err != nil {
				return 0, ioError(err)
			}
		}
		if (off+int64(len(p)))&(bs-1) != 0 && (last != first || off&(bs-1) == 0) {
			if err := v.readBlocks(buf[(nb-1)*uint64(bs):], last); err != nil {
				return 0, ioError(err)
			}
		}
		copy(buf[off-int64(first)<<v.bshift:], p)
		payload = buf
	}
	return v.logData(int64(first)<<v.bshift, payload)
}

// logData appends block-aligned data as one record, or as several when the
// WAL is too small for one (only tiny test WALs).
func (v *Volume) logData(off int64, data []byte) (uint64, error) {
	maxRec := v.maxRecordPayload()
	var lsn uint64
	for len(data) > 0 {
		n := min(len(data), maxRec)
		var err error
		lsn, err = v.appendRecord(wal.Record{Type: wal.Write, Offset: off, Length: uint32(n), Payload: data[:n]}, false)
		if err != nil {
			return 0, err
		}
		data, off = data[n:], off+int64(n)
	}
	return lsn, nil
}

func (v *Volume) maxRecordPayload() int {
	m := int64(blockdev.MaxIOSize)
	if q := (v.walSize / 4) &^ (v.bs - 1); q < m {
		m = q
	}
	return int(m)
}

// Flush makes every write acknowledged before it durable (one WAL
// fdatasync, shared with concurrent flushes, after the data files' when
// large writes went there: redirect.go).
func (v *Volume) Flush() error {
	v.ioMu.RLock()
	defer v.ioMu.RUnlock()
	if v.closed.Load() {
		return fmt.Errorf("blockvol: flush: %w", blockdev.ErrClosed)
	}
	if err := v.syncWAL(v.headLSN.Load()); err != nil {
		return fmt.Errorf("blockvol: flush: %w", err)
	}
	return nil
}

// Trim discards [off, off+length): it reads as zeroes at once and the
// extent's space is given back (hole punch) when the flusher applies it.
func (v *Volume) Trim(off, length int64) error {
	if err := v.begin("trim", off, length, 0, true); err != nil {
		return err
	}
	defer v.ioMu.RUnlock()
	if err := v.zero(off, length); err != nil {
		return fmt.Errorf("blockvol: trim off=%d len=%d: %w", off, length, err)
	}
	return nil
}

// WriteZeroes makes [off, off+length) read as zeroes. The extent range is
// always punched (a hole reads as zeroes); punch=false is accepted and
// treated the same way, which the Device contract allows ("may").
func (v *Volume) WriteZeroes(off, length int64, punch bool) error {
	if err := v.begin("write-zeroes", off, length, 0, true); err != nil {
		return err
	}
	defer v.ioMu.RUnlock()
	if err := v.zero(off, length); err != nil {
		return fmt.Errorf("blockvol: write-zeroes off=%d len=%d: %w", off, length, err)
	}
	return nil
}

// zero writes partial edge blocks as zero data and the block-aligned
// middle as Zero records (split below 4 GiB, the record's length limit).
func (v *Volume) zero(off, length int64) error {
	bs := v.bs
	end := off + length
	alStart := (off + bs - 1) &^ (bs - 1)
	alEnd := end &^ (bs - 1)
	if alStart >= alEnd {
		// Entirely inside one or two partial blocks.
		return v.zeroPartial(off, end)
	}
	if off < alStart {
		if err := v.zeroPartial(off, alStart); err != nil {
			return err
		}
	}
	const maxZero = (1<<32 - 1) &^ (1<<16 - 1)
	for s := alStart; s < alEnd; {
		n := min(alEnd-s, maxZero)
		first, nb := uint64(s>>v.bshift), uint64(n>>v.bshift)
		v.lockStripes(first, nb)
		err := v.settleRange(first, nb)
		if err == nil {
			_, err = v.appendRecord(wal.Record{Type: wal.Zero, Offset: s, Length: uint32(n)}, false)
		}
		v.unlockStripes(first, nb)
		if err != nil {
			return err
		}
		s += n
	}
	if v.zeros.n.Load() > 32 {
		v.kick()
	}
	if alEnd < end {
		return v.zeroPartial(alEnd, end)
	}
	return nil
}

var zeroPage [64 << 10]byte

func (v *Volume) zeroPartial(off, end int64) error {
	for off < end {
		n := min(end-off, int64(len(zeroPage)))
		if _, err := v.write(zeroPage[:n], off); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// BlockStatus describes [off, off+length): ranges with data, and holes
// (trimmed or never written) that read as zeroes. Allocation comes from
// the extent file (SEEK_DATA/SEEK_HOLE) overlaid with the dirty blocks and
// pending zero ranges. When blocks are dirty the answer may stop short of
// length (at most blockStatusMax bytes), as the contract allows.
func (v *Volume) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := v.begin("block-status", off, length, 0, false); err != nil {
		return nil, err
	}
	defer v.ioMu.RUnlock()
	bs := v.bs
	start := off &^ (bs - 1)
	end := (off + length + bs - 1) &^ (bs - 1)
	overlay := v.dirty.len() != 0 || v.zeros.n.Load() != 0
	if overlay && end-start > blockStatusMax {
		end = start + blockStatusMax
	}
	alloc, err := v.allocatedData(start, end-start)
	if err != nil {
		return nil, fmt.Errorf("blockvol: block-status: %w", ioError(err))
	}
	var out []blockdev.Extent
	emit := func(o, l int64, hole bool) {
		if n := len(out); n > 0 && out[n-1].Hole == hole && out[n-1].Offset+out[n-1].Length == o {
			out[n-1].Length += l
			return
		}
		out = append(out, blockdev.Extent{Offset: o, Length: l, Hole: hole, Zero: hole})
	}
	if !overlay {
		pos := start
		for _, r := range alloc {
			// Round to blocks: a partly allocated block has data.
			rs := r.Off &^ (bs - 1)
			re := (r.Off + r.Len + bs - 1) &^ (bs - 1)
			if rs < pos {
				rs = pos
			}
			if rs > pos {
				emit(pos, rs-pos, true)
			}
			if re > rs {
				emit(rs, re-rs, false)
				pos = re
			}
		}
		if pos < end {
			emit(pos, end-pos, true)
		}
	} else {
		ai := 0
		for b := start; b < end; b += bs {
			for ai < len(alloc) && alloc[ai].Off+alloc[ai].Len <= b {
				ai++
			}
			allocated := ai < len(alloc) && alloc[ai].Off < b+bs
			switch src, _ := v.classify(uint64(b >> v.bshift)); src {
			case srcWAL:
				allocated = true
			case srcZero:
				allocated = false
			}
			emit(b, bs, !allocated)
		}
	}
	return clipExtents(out, off, length), nil
}

// clipExtents trims block-aligned extents to [off, off+length): the
// first may start before off and the last end past the range.
func clipExtents(out []blockdev.Extent, off, length int64) []blockdev.Extent {
	if len(out) > 0 {
		if d := off - out[0].Offset; d > 0 {
			out[0].Offset += d
			out[0].Length -= d
		}
		last := &out[len(out)-1]
		if e := last.Offset + last.Length; e > off+length {
			last.Length -= e - (off + length)
		}
	}
	return out
}

const blockStatusMax = 64 << 20
