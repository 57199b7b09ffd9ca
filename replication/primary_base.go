package replication

// The base sender of a resync or rebuild: region data in runs of up to
// baseChunk, zero runs sent without data. A run the engine reports as
// unallocated is not even read, so a rebuild costs what is allocated,
// not the volume's size.

import (
	"fmt"
)

const baseChunk = 1 << 20

// baseHdrLen is the size of a BaseChunk's header (its payload before the
// data): sendBase reads the data right behind it in one buffer, so the
// payload is sent from where it was read, without a copy.
var baseHdrLen = int64(len(BaseChunk{}.Encode(nil)))

func (s *session) baseRemaining() bool { return s.kind != TransferNone && s.progress < s.nRegions }

func (s *session) region(i int64) int64 {
	if s.all {
		return i
	}
	return int64(s.regions[i])
}

// sendBase sends the next run of contiguous regions (up to baseChunk).
// buf holds baseHdrLen+baseChunk bytes.
func (s *session) sendBase(buf, zero []byte) error {
	p := s.r.p
	rs := p.cfg.RegionSize
	size := p.vol.Size()
	first := s.region(s.progress)
	n := int64(1)
	for s.progress+n < s.nRegions && s.region(s.progress+n) == first+n && (n+1)*rs <= baseChunk {
		n++
	}
	off := first * rs
	length := min(n*rs, size-off)
	if length <= 0 || off >= size {
		s.progress += n
		s.r.prog.setBase(s.progress, rs)
		return nil
	}
	data := buf[baseHdrLen : baseHdrLen+length]
	hole := s.isHole(off, length)
	if !hole {
		if err := p.vol.ReadAt(data, off); err != nil {
			return fmt.Errorf("read base at %d: %w", off, err)
		}
	}
	s.progress += n
	s.r.prog.setBase(s.progress, rs)
	c := BaseChunk{Offset: off, Length: uint32(length), Done: s.progress}
	if hole || string(data) == string(zero[:length]) {
		c.Zero = true
		return s.write(&Msg{Type: MsgBase, Payload: c.Encode(buf[:0])})
	}
	s.baseBytes += length
	s.r.baseBytes.Add(length)
	// The header is encoded in front of the data (c.Data left nil):
	// the payload is the buffer as read.
	if hdr := c.Encode(buf[:0]); int64(len(hdr)) != baseHdrLen {
		return fmt.Errorf("base chunk header of %d bytes, want %d", len(hdr), baseHdrLen)
	}
	return s.write(&Msg{Type: MsgBase, Payload: buf[:baseHdrLen+length]})
}

// isHole reports whether [off, off+length) reads as zeroes by the
// engine's own account (BLOCK_STATUS: nothing in the extent file, no
// write in the WAL). Any doubt (an error, a short answer) says no: the
// run is then read and compared.
func (s *session) isHole(off, length int64) bool {
	ext, err := s.r.p.vol.BlockStatus(off, length)
	if err != nil {
		return false
	}
	end := off
	for _, e := range ext {
		if !e.Zero || e.Offset != end {
			return false
		}
		end += e.Length
	}
	return end >= off+length
}
