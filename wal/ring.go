package wal

// Ring maps ever-increasing logical log positions onto a file of Size
// bytes: physical = logical mod Size. Head and tail are logical positions;
// head-tail is the number of live bytes and never exceeds Size. Records
// never straddle the physical end: a record that does not fit in what is
// left of the current lap starts at the next lap, and the gap is filled by
// a Padding record (or, when even a header does not fit, left unused; the
// scanner skips such a short gap by itself).
type Ring struct {
	Size int64
}

// Phys is the physical file offset of a logical position.
func (r Ring) Phys(pos uint64) int64 { return int64(pos % uint64(r.Size)) }

// Remaining is the number of bytes from pos to the physical end of the ring.
func (r Ring) Remaining(pos uint64) int64 { return r.Size - r.Phys(pos) }

// Place returns where a record of n bytes appended at head starts, and the
// size of the gap before it (0 when it fits in the current lap). The
// reservation for the record is [head, start+n).
func (r Ring) Place(head uint64, n int) (start uint64, gap int64) {
	rem := r.Remaining(head)
	if int64(n) <= rem {
		return head, 0
	}
	return head + uint64(rem), rem
}
