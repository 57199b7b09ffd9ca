package blockvol

import (
	"fmt"
	"slices"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

// Rewriter writes into a volume under Rewrite: every write is an ordinary
// WAL record (replicated like any write).
type Rewriter interface {
	WriteAt(p []byte, off int64) error
	Zero(off, length int64) error
}

type rewriter struct{ v *Volume }

func (w rewriter) WriteAt(p []byte, off int64) error {
	v := w.v
	if err := blockdev.CheckRange(v.size.Load(), off, int64(len(p)), blockdev.MaxIOSize); err != nil {
		return fmt.Errorf("blockvol: rewrite: write off=%d len=%d: %w", off, len(p), err)
	}
	if _, err := v.write(p, off); err != nil {
		return fmt.Errorf("blockvol: rewrite: write off=%d len=%d: %w", off, len(p), err)
	}
	return nil
}

func (w rewriter) Zero(off, length int64) error {
	v := w.v
	if err := blockdev.CheckRange(v.size.Load(), off, length, 0); err != nil {
		return fmt.Errorf("blockvol: rewrite: zero off=%d len=%d: %w", off, length, err)
	}
	if err := v.zero(off, length); err != nil {
		return fmt.Errorf("blockvol: rewrite: zero off=%d len=%d: %w", off, length, err)
	}
	return nil
}

// Rewrite runs fn with I/O blocked (exclusive lock; the flusher keeps
// running so the WAL drains): w's writes become ordinary WAL records.
// Afterwards, whether fn failed or not, what it wrote is made durable and
// flushed into the extent. Snapshot operations wait meanwhile. fn must
// not call the volume's other methods.
func (v *Volume) Rewrite(fn func(w Rewriter) error) error {
	v.snaps.opMu.Lock()
	defer v.snaps.opMu.Unlock()
	v.ioMu.Lock()
	defer v.ioMu.Unlock()
	if err := v.snapOpCheck(); err != nil {
		return fmt.Errorf("blockvol: rewrite: %w", err)
	}
	return v.rewriteLocked(fn)
}

func (v *Volume) rewriteLocked(fn func(w Rewriter) error) error {
	ferr := fn(rewriter{v})
	if err := v.syncWAL(v.headLSN.Load()); err != nil {
		return fmt.Errorf("blockvol: rewrite: %w", err)
	}
	if err := v.flushAllLocked(); err != nil {
		return fmt.Errorf("blockvol: rewrite: %w", err)
	}
	return ferr
}

// RestoreSnapshot reverts the volume to the snapshot name: with I/O
// drained and blocked it writes every block that may have changed since
// the snapshot back to its snapshot content, as ordinary WAL records
// (replicas follow by plain shipping), then flushes locally. The
// snapshot and newer ones stay (the flusher preserves what the restore
// overwrites). A volume grown since the snapshot reads as zeroes past
// the snapshot's size afterwards.
func (v *Volume) RestoreSnapshot(name string) error {
	v.snaps.opMu.Lock()
	defer v.snaps.opMu.Unlock()
	v.ioMu.Lock()
	defer v.ioMu.Unlock()
	if err := v.snapOpCheck(); err != nil {
		return fmt.Errorf("blockvol: restore snapshot %q: %w", name, err)
	}
	list := v.snapList()
	i := findSnap(list, name)
	if i < 0 {
		return fmt.Errorf("blockvol: restore snapshot %q: %w", name, ErrSnapshotNotFound)
	}
	s := list[i]
	// With the WAL flushed, everything changed since s is in the files of
	// s and the newer snapshots.
	if err := v.flushAllLocked(); err != nil {
		return fmt.Errorf("blockvol: restore snapshot %q: %w", name, err)
	}
	limit := uint64(s.info.SizeBytes) >> v.bshift
	var blocks []uint64
	for _, o := range list[i:] {
		o.mu.RLock()
		for b := range o.idx {
			if b < limit {
				blocks = append(blocks, b)
			}
		}
		o.mu.RUnlock()
	}
	slices.Sort(blocks)
	blocks = slices.Compact(blocks)
	head0 := v.headLSN.Load()
	err := v.rewriteLocked(func(w Rewriter) error {
		return v.restoreBlocks(s, blocks)
	})
	if err == nil && v.size.Load() > s.info.SizeBytes {
		err = v.rewriteLocked(func(w Rewriter) error {
			return w.Zero(s.info.SizeBytes, v.size.Load()-s.info.SizeBytes)
		})
	}
	if err != nil {
		return fmt.Errorf("blockvol: restore snapshot %q: %w", name, err)
	}
	v.log.Info("engine_snapshot_restored", "snapshot", name, "id", s.info.ID, "snapshot_lsn", s.info.LSN,
		"blocks", len(blocks), "from_lsn", head0+1, "to_lsn", v.headLSN.Load())
	return nil
}

// restoreBlocks writes s's content of blocks (sorted) as WAL records:
// runs of consecutive blocks with data as one Write, zero blocks as Zero.
func (v *Volume) restoreBlocks(s *snapshot, blocks []uint64) error {
	bs := v.bs
	maxRun := max(v.maxRecordPayload()/int(bs), 1)
	buf := make([]byte, int64(maxRun)*bs)
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && j-i < maxRun && blocks[j] == blocks[j-1]+1 {
			j++
		}
		p := buf[:int64(j-i)*bs]
		if err := v.readSnap(s, p, int64(blocks[i])<<v.bshift); err != nil {
			return err
		}
		// Split the run into zero and data parts.
		for k := 0; k < j-i; {
			zero := allZero(p[int64(k)*bs : int64(k+1)*bs])
			m := k + 1
			for m < j-i && allZero(p[int64(m)*bs:int64(m+1)*bs]) == zero {
				m++
			}
			off := int64(blocks[i]+uint64(k)) << v.bshift
			var err error
			if zero {
				_, err = v.appendRecord(wal.Record{Type: wal.Zero, Offset: off, Length: uint32(int64(m-k) * bs)}, false)
			} else {
				_, err = v.logData(off, p[int64(k)*bs:int64(m)*bs])
			}
			if err != nil {
				return err
			}
			k = m
		}
		i = j
	}
	return nil
}

// ChangedRanges returns the sorted, merged byte ranges whose content may
// differ between snapshot from and snapshot to (to == "": the live volume
// now). from must not be newer than to.
func (v *Volume) ChangedRanges(from, to string) ([]Range, error) {
	v.ioMu.RLock()
	defer v.ioMu.RUnlock()
	if v.closed.Load() {
		return nil, fmt.Errorf("blockvol: changed ranges: %w", blockdev.ErrClosed)
	}
	// Unflushed changes first: the flusher publishes a pre-image before
	// it drops a block from the dirty map, so nothing falls in between.
	var rs []blockRange
	if to == "" {
		for _, e := range collectAll(&v.dirty) {
			rs = append(rs, blockRange{e.block, e.block + 1})
		}
		for _, z := range v.zeros.collect() {
			rs = append(rs, blockRange{z.start, z.end})
		}
	}
	v.snaps.mu.RLock()
	list := v.snaps.list
	kf := findSnap(list, from)
	if kf < 0 {
		v.snaps.mu.RUnlock()
		return nil, fmt.Errorf("blockvol: changed ranges from %q: %w", from, ErrSnapshotNotFound)
	}
	kt, sizeTo := len(list), v.size.Load()
	if to != "" {
		if kt = findSnap(list, to); kt < 0 {
			v.snaps.mu.RUnlock()
			return nil, fmt.Errorf("blockvol: changed ranges to %q: %w", to, ErrSnapshotNotFound)
		}
		sizeTo = list[kt].info.SizeBytes
	}
	if kt < kf {
		v.snaps.mu.RUnlock()
		return nil, fmt.Errorf("blockvol: changed ranges from %q to %q: %q is the newer one: %w", from, to, from, blockdev.ErrInvalid)
	}
	sizeFrom := list[kf].info.SizeBytes
	for _, s := range list[kf:kt] {
		s.mu.RLock()
		for b := range s.idx {
			rs = append(rs, blockRange{b, b + 1})
		}
		s.mu.RUnlock()
	}
	v.snaps.mu.RUnlock()
	if sizeTo > sizeFrom {
		rs = append(rs, blockRange{uint64(sizeFrom) >> v.bshift, uint64(sizeTo) >> v.bshift})
	}
	limit := uint64(sizeTo) >> v.bshift
	slices.SortFunc(rs, func(a, b blockRange) int { return cmpU64(a.start, b.start) })
	var out []Range
	for _, r := range rs {
		r.end = min(r.end, limit)
		if r.start >= r.end {
			continue
		}
		off, end := int64(r.start)<<v.bshift, int64(r.end)<<v.bshift
		if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len >= off {
			out[n-1].Len = max(out[n-1].Len, end-out[n-1].Off)
			continue
		}
		out = append(out, Range{Off: off, Len: end - off})
	}
	return out, nil
}

type blockRange struct{ start, end uint64 }
