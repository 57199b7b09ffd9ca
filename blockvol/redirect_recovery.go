package blockvol

// Redirect records read back (see redirect.go): recovery's decision on
// each, and catch-up turning one into the Write it stands for.

import (
	"fmt"
	"sync"

	"github.com/blockd/blockd/wal"
)

// recRedirect is a Redirect record found by recovery's scan; the
// decision on it waits for the end of the scan (resolveRedirects).
type recRedirect struct {
	pos, lsn uint64
	off      int64
	rp       wal.RedirectPayload // payload copied out of the scan buffer
}

// collectRedirect keeps a Redirect record of the scan for
// resolveRedirects.
func (v *Volume) collectRedirect(list []recRedirect, pos uint64, rec wal.Record) ([]recRedirect, error) {
	if _, err := v.checkRedirect(rec); err != nil {
		return list, err
	}
	rp, _ := wal.DecodeRedirectPayload(append([]byte(nil), rec.Payload...))
	return append(list, recRedirect{pos: pos, lsn: rec.LSN, off: rec.Offset, rp: rp}), nil
}

// resolveRedirects decides, after the scan, which Redirect records
// recovery applies, and applies them in LSN order. One the persisted
// DurableLSN covers is applied as it is. Any other needs each of its
// chunks to hold the data its checksum names, or to be covered by a later
// record that is applied: an in-place overwrite destroys an older
// record's data only in the chunks it rewrites, and makes it durable only
// together with itself (chooseSyncLSN), so a flushed record whose other
// chunks are intact stays. Anything else is skipped: torn, or
// overwritten and never flushed, so wholly absent. It returns how many
// were skipped and the first one's LSN.
func (v *Volume) resolveRedirects(list []recRedirect) (int, uint64, error) {
	s := &v.slots
	valid := make([]bool, len(list))
	covered := make(map[uint64]bool)
	var buf []byte
	for k := len(list) - 1; k >= 0; k-- {
		r := &list[k]
		c0 := uint64(r.off >> s.cshift)
		ok := r.lsn <= v.sb.DurableLSN
		if !ok {
			ok = true
			if cap(buf) < int(s.chunk) {
				buf = make([]byte, s.chunk)
			}
			for i := 0; i < r.rp.Chunks() && ok; i++ {
				if covered[c0+uint64(i)] {
					continue
				}
				o := r.off + int64(i)<<s.cshift
				if m, err := v.dataFile(r.rp.Slot(i)).ReadAt(buf[:s.chunk], o); err != nil && m < int(s.chunk) {
					return 0, 0, fmt.Errorf("read redirected data of LSN %d at %d: %w", r.lsn, o, err)
				}
				ok = wal.ChunkSum(buf[:s.chunk]) == r.rp.CRC(i)
			}
		}
		valid[k] = ok
		if ok {
			for i := 0; i < r.rp.Chunks(); i++ {
				covered[c0+uint64(i)] = true
			}
		}
	}
	discarded, first := 0, uint64(0)
	for k := range list {
		r := &list[k]
		c0 := uint64(r.off >> s.cshift)
		nc := r.rp.Chunks()
		if !valid[k] {
			if discarded == 0 {
				first = r.lsn
			}
			discarded++
			if v.trace != nil {
				v.trace("recover redirect lsn=%d chunk %d+%d DISCARDED", r.lsn, c0, nc)
			}
			v.log.Info("engine_recovery_redirect_discarded", "lsn", r.lsn, "offset", r.off, "length", r.rp.DataLen,
				"reason", "its data does not match the record's checksums (torn, or overwritten and never flushed)")
			continue
		}
		if v.trace != nil {
			v.trace("recover redirect lsn=%d chunk %d+%d trusted=%v", r.lsn, c0, nc, r.lsn <= v.sb.DurableLSN)
		}
		// Older dirty blocks and zero ranges of these chunks are superseded.
		fb := uint64(r.off >> v.bshift)
		end := fb + uint64(int64(r.rp.DataLen)>>v.bshift)
		v.dirty.removeOlder(fb, end, r.pos)
		v.zeros.carve(fb, end, r.pos)
		slots := make([]uint8, nc)
		for i := range slots {
			slots[i] = r.rp.Slot(i)
		}
		v.redirectApplied(c0, slots, r.lsn, r.pos, int64(r.rp.DataLen))
	}
	return discarded, first, nil
}

// checkRedirect validates a Redirect record against the volume.
func (v *Volume) checkRedirect(rec wal.Record) (wal.RedirectPayload, error) {
	rp, err := wal.DecodeRedirectPayload(rec.Payload)
	if err != nil {
		return rp, err
	}
	if int64(rp.ChunkSize) != v.slots.chunk || rec.Offset&(v.slots.chunk-1) != 0 {
		return rp, fmt.Errorf("redirect at %d in chunks of %d, volume uses %d", rec.Offset, rp.ChunkSize, v.slots.chunk)
	}
	if err := checkExtent(v.recordLimit(), v.bs, rec.Offset, int64(rp.DataLen)); err != nil {
		return rp, fmt.Errorf("redirect [%d,+%d): %w", rec.Offset, rp.DataLen, err)
	}
	return rp, nil
}

// redirectAsWrite turns a Redirect record read back from the log into the
// Write record it stands for (resync of a replica), with its data read from
// the slots the record names. It fails with ErrNotRetained when the data
// was overwritten since (a later redirect of the same chunk, or the
// flusher): the caller must fall back to a full transfer.
func (v *Volume) redirectAsWrite(rec wal.Record, buf []byte) (wal.Record, error) {
	rp, err := v.checkRedirect(rec)
	if err != nil {
		return rec, fmt.Errorf("%w: LSN %d: %v", ErrCorrupt, rec.LSN, err)
	}
	if cap(buf) < int(rp.DataLen) {
		buf = make([]byte, rp.DataLen)
	}
	buf = buf[:rp.DataLen]
	s := &v.slots
	s.chunkLocks(rec.Offset, int64(rp.DataLen), func(l *sync.RWMutex) { l.RLock() })
	bad := -1
	for i := 0; i < rp.Chunks() && err == nil && bad < 0; i++ {
		o := int64(i) << s.cshift
		var m int
		if m, err = v.dataFile(rp.Slot(i)).ReadAt(buf[o:o+s.chunk], rec.Offset+o); m == int(s.chunk) {
			err = nil
		}
		if err == nil && wal.ChunkSum(buf[o:o+s.chunk]) != rp.CRC(i) {
			bad = i
		}
	}
	s.chunkLocks(rec.Offset, int64(rp.DataLen), func(l *sync.RWMutex) { l.RUnlock() })
	if err != nil {
		return rec, fmt.Errorf("read redirected data of LSN %d: %w", rec.LSN, err)
	}
	if bad >= 0 {
		return rec, fmt.Errorf("data of LSN %d (redirect [%d,+%d)) was overwritten since: %w", rec.LSN, rec.Offset, rp.DataLen, ErrNotRetained)
	}
	return wal.Record{LSN: rec.LSN, Epoch: rec.Epoch, Gen: rec.Gen, Type: wal.Write, Offset: rec.Offset, Length: rp.DataLen, Payload: buf}, nil
}

// capTrust is the DurableLSN that may be persisted when lsn is durable.
func (s *slotState) capTrust(lsn uint64) uint64 {
	if c := s.trustCap.Load(); c != 0 && lsn > c {
		return c
	}
	return lsn
}

// checkpointDiscarded runs, in Open, when recovery discarded a redirect:
// every recovered record is checkpointed, so the discarded one is never
// replayed again, and only then may DurableLSN cover it (a later recovery
// would apply a record under DurableLSN without checking its data).
func (v *Volume) checkpointDiscarded() error {
	if v.slots.trustCap.Load() == 0 {
		return nil
	}
	head := v.headLSN.Load()
	for v.ckptLSN.Load() < head {
		progressed, err := v.flushCycle()
		if err != nil {
			return fmt.Errorf("checkpoint after discarding redirects: %w", err)
		}
		if !progressed {
			return fmt.Errorf("checkpoint after discarding redirects: no progress at LSN %d of %d", v.ckptLSN.Load(), head)
		}
	}
	v.slots.trustCap.Store(0)
	return nil
}
