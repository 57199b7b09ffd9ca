package blockvol

import (
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/blockd/blockd/blockdev"
)

// SnapshotReader is a read-only blockdev.Device of one snapshot. While it
// is open the snapshot cannot be deleted on this volume (ErrSnapshotBusy).
type SnapshotReader struct {
	v      *Volume
	s      *snapshot
	closed atomic.Bool
}

var _ blockdev.Device = (*SnapshotReader)(nil)

// OpenSnapshot opens the snapshot name for reading.
func (v *Volume) OpenSnapshot(name string) (*SnapshotReader, error) {
	if v.closed.Load() {
		return nil, fmt.Errorf("blockvol: open snapshot %q: %w", name, blockdev.ErrClosed)
	}
	v.snaps.mu.Lock()
	defer v.snaps.mu.Unlock()
	i := findSnap(v.snaps.list, name)
	if i < 0 || v.snaps.list[i].deleting {
		return nil, fmt.Errorf("blockvol: open snapshot %q: %w", name, ErrSnapshotNotFound)
	}
	s := v.snaps.list[i]
	s.refs++
	return &SnapshotReader{v: v, s: s}, nil
}

// Info describes the snapshot.
func (r *SnapshotReader) Info() SnapshotInfo { return r.s.infoNow() }

// Close releases the snapshot; further reads fail with ErrClosed.
func (r *SnapshotReader) Close() error {
	if r.closed.Swap(true) {
		return nil
	}
	r.v.snaps.mu.Lock()
	r.s.refs--
	r.v.snaps.mu.Unlock()
	return nil
}

// Size is the volume's size when the snapshot was taken.
func (r *SnapshotReader) Size() int64 { return r.s.info.SizeBytes }

// BlockSize is the volume's block size.
func (r *SnapshotReader) BlockSize() int { return int(r.v.bs) }

func (r *SnapshotReader) begin(op string, off, length, maxLen int64) error {
	if err := blockdev.CheckRange(r.s.info.SizeBytes, off, length, maxLen); err != nil {
		return fmt.Errorf("blockvol: snapshot %q: %s off=%d len=%d: %w", r.s.info.Name, op, off, length, err)
	}
	r.v.ioMu.RLock()
	switch {
	case r.closed.Load() || r.v.closed.Load():
		r.v.ioMu.RUnlock()
		return fmt.Errorf("blockvol: snapshot %q: %s: %w", r.s.info.Name, op, blockdev.ErrClosed)
	case r.s.gone.Load():
		r.v.ioMu.RUnlock()
		return fmt.Errorf("blockvol: snapshot %q: %s: %w", r.s.info.Name, op, ErrSnapshotNotFound)
	}
	return nil
}

// ReadAt reads the snapshot's content.
func (r *SnapshotReader) ReadAt(p []byte, off int64) error {
	if err := r.begin("read", off, int64(len(p)), blockdev.MaxIOSize); err != nil {
		return err
	}
	defer r.v.ioMu.RUnlock()
	if err := r.v.readSnap(r.s, p, off); err != nil {
		return fmt.Errorf("blockvol: snapshot %q: read off=%d len=%d: %w", r.s.info.Name, off, len(p), ioError(err))
	}
	return nil
}

// WriteAt fails: a snapshot is read-only.
func (r *SnapshotReader) WriteAt(p []byte, off int64, fua bool) error {
	return fmt.Errorf("blockvol: snapshot %q: write: %w", r.s.info.Name, blockdev.ErrReadOnly)
}

// Flush has nothing to do.
func (r *SnapshotReader) Flush() error { return nil }

// Trim fails: a snapshot is read-only.
func (r *SnapshotReader) Trim(off, length int64) error {
	return fmt.Errorf("blockvol: snapshot %q: trim: %w", r.s.info.Name, blockdev.ErrReadOnly)
}

// WriteZeroes fails: a snapshot is read-only.
func (r *SnapshotReader) WriteZeroes(off, length int64, punch bool) error {
	return fmt.Errorf("blockvol: snapshot %q: write-zeroes: %w", r.s.info.Name, blockdev.ErrReadOnly)
}

// chain returns the snapshots a read of s consults, s first. The caller
// holds snaps.mu shared.
func (v *Volume) chainLocked(s *snapshot) ([]*snapshot, error) {
	i := slices.Index(v.snaps.list, s)
	if i < 0 {
		return nil, fmt.Errorf("snapshot %q: %w", s.info.Name, ErrSnapshotNotFound)
	}
	return v.snaps.list[i:], nil
}

func chainLookup(chain []*snapshot, b uint64) (*snapshot, int64, bool) {
	for _, s := range chain {
		if off, ok := s.lookup(b); ok {
			return s, off, true
		}
	}
	return nil, 0, false
}

// readSnap reads any 512-aligned range of snapshot s.
func (v *Volume) readSnap(s *snapshot, p []byte, off int64) error {
	v.snaps.mu.RLock()
	defer v.snaps.mu.RUnlock()
	chain, err := v.chainLocked(s)
	if err != nil {
		return err
	}
	bs := v.bs
	if off&(bs-1) == 0 && int64(len(p))&(bs-1) == 0 {
		return v.readSnapBlocks(chain, p, uint64(off>>v.bshift))
	}
	blk := make([]byte, bs)
	for len(p) > 0 {
		b := off >> v.bshift
		in := off - b<<v.bshift
		n := min(int64(len(p)), bs-in)
		if err := v.readSnapBlocks(chain, blk, uint64(b)); err != nil {
			return err
		}
		copy(p[:n], blk[in:in+n])
		p, off = p[n:], off+n
	}
	return nil
}

// readSnapBlocks reads whole blocks from first of the snapshot chain[0].
// A block no snapshot of the chain holds comes from the extent, and is
// looked up again after the extent read: the flusher publishes a
// pre-image before it overwrites the extent, so a block still absent
// after the read was read before any overwrite.
func (v *Volume) readSnapBlocks(chain []*snapshot, p []byte, first uint64) error {
	bs := uint64(v.bs)
	n := uint64(len(p)) / bs
	for i := uint64(0); i < n; {
		if s, off, ok := chainLookup(chain, first+i); ok {
			if err := v.readSnapBlock(s, off, p[i*bs:(i+1)*bs]); err != nil {
				return err
			}
			i++
			continue
		}
		j := i + 1
		for j < n && j-i < 256 {
			if _, _, ok := chainLookup(chain, first+j); ok {
				break
			}
			j++
		}
		if err := v.readExtent(p[i*bs:j*bs], int64(first+i)*int64(bs)); err != nil {
			return err
		}
		for k := i; k < j; k++ {
			if s, off, ok := chainLookup(chain, first+k); ok {
				if err := v.readSnapBlock(s, off, p[k*bs:(k+1)*bs]); err != nil {
					return err
				}
			}
		}
		i = j
	}
	return nil
}

// BlockStatus reports the snapshot's allocation: preserved blocks with
// data are allocated, preserved zero blocks are holes, the rest is the
// extent's allocation (queried before the snapshots are consulted, for
// the same reason as in readSnapBlocks). The answer may stop short of
// length (at most blockStatusMax bytes).
func (r *SnapshotReader) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := r.begin("block-status", off, length, 0); err != nil {
		return nil, err
	}
	defer r.v.ioMu.RUnlock()
	v := r.v
	bs := v.bs
	start := off &^ (bs - 1)
	end := min((off+length+bs-1)&^(bs-1), start+blockStatusMax)
	v.snaps.mu.RLock()
	defer v.snaps.mu.RUnlock()
	chain, err := v.chainLocked(r.s)
	if err != nil {
		return nil, fmt.Errorf("blockvol: snapshot %q: block-status: %w", r.s.info.Name, err)
	}
	alloc, err := v.allocatedData(start, end-start)
	if err != nil {
		return nil, fmt.Errorf("blockvol: snapshot %q: block-status: %w", r.s.info.Name, ioError(err))
	}
	var out []blockdev.Extent
	ai := 0
	for b := start; b < end; b += bs {
		for ai < len(alloc) && alloc[ai].Off+alloc[ai].Len <= b {
			ai++
		}
		allocated := ai < len(alloc) && alloc[ai].Off < b+bs
		if _, o, ok := chainLookup(chain, uint64(b>>v.bshift)); ok {
			allocated = o != snapZeroEnt
		}
		if n := len(out); n > 0 && out[n-1].Hole == !allocated && out[n-1].Offset+out[n-1].Length == b {
			out[n-1].Length += bs
			continue
		}
		out = append(out, blockdev.Extent{Offset: b, Length: bs, Hole: !allocated, Zero: !allocated})
	}
	return clipExtents(out, off, length), nil
}
