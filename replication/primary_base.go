package replication

// The base sender of a resync or rebuild: region data in runs of up to
// baseChunk, zero runs sent without data.

import (
	"fmt"
)

const baseChunk = 1 << 20

func (s *session) baseRemaining() bool { return s.kind != TransferNone && s.progress < s.nRegions }

func (s *session) region(i int64) int64 {
	if s.all {
		return i
	}
	return int64(s.regions[i])
}

// sendBase sends the next run of contiguous regions (up to baseChunk).
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
	data := buf[:length]
	if err := p.vol.ReadAt(data, off); err != nil {
		return fmt.Errorf("read base at %d: %w", off, err)
	}
	s.progress += n
	s.r.prog.setBase(s.progress, rs)
	c := BaseChunk{Offset: off, Length: uint32(length), Done: s.progress}
	if string(data) == string(zero[:length]) {
		c.Zero = true
	} else {
		c.Data = data
		s.baseBytes += length
		s.r.baseBytes.Add(length)
	}
	return s.write(&Msg{Type: MsgBase, Payload: c.Encode(make([]byte, 0, 32+len(c.Data)))})
}
