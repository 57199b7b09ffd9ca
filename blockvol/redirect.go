package blockvol

// Large writes, written once.
//
// A WAL writes every byte twice: into the log, then into the extent. For
// large writes that halves the disk's bandwidth. A large write that covers
// whole chunks (redirChunk bytes, aligned) instead writes its data once,
// straight into a data file, and logs only a Redirect record naming where
// the data went, with a checksum per chunk (wal.ChunkSum).
//
// Writing in place would break the crash contract: a torn large write
// that no flush covered would be neither wholly present nor wholly absent,
// and the old data would be gone. So every chunk has two places, slot 0
// in the extent file and slot 1 at the same offset in the shadow file
// (sparse, as large as the extent), and one bit saying which slot holds
// the chunk's data. A redirected write goes to a slot that no crash can
// need:
//
//   - the durable slot of a chunk is the slot of its newest Redirect that
//     a flush made durable (data and record), or, when there is none
//     since the checkpoint, the slot persisted with the checkpoint in the
//     slots file. A crash always finds the chunk's data there or newer,
//     so that slot is never written by a redirect.
//   - the write goes to the other slot. That is the current slot itself
//     when the chunk's newest redirect is not durable yet (it is then
//     overwritten in place: losing it is allowed, it was never flushed),
//     or the old slot (a flip) when it is.
//
// Recovery replays a Redirect whose LSN the superblock's DurableLSN
// covers as it is (its data was synced before its record); any other only
// if each of its chunks still has the checksum the record names or is
// covered by a later replayed Redirect, and skips it otherwise, so a torn
// or overwritten, never-flushed one is wholly absent (resolveRedirects).
// Records after it are still replayed.
//
// Rules that keep those checks meaningful:
//
//   - A redirect happens only on a chunk with no dirty block and no
//     pending zero range, and never while the volume has snapshots (their
//     copy-on-write runs in the flusher, which must see every overwrite).
//   - Before a small write or a zero range goes into a chunk whose newest
//     Redirect is not covered by the persisted DurableLSN, that Redirect is
//     made durable and the DurableLSN persisted (settleRange): the flusher
//     will later write the small write into the slot, which changes its
//     checksum.
//   - An in-place overwrite of record X by record Y registers (X, Y)
//     under regMu, where the WAL sync chooses how far it goes: no sync
//     then covers X without Y (chooseSyncLSN waits until Y is complete),
//     or a flush could promise X while Y destroyed its data. A chunk whose
//     newest redirect a running sync has chosen but not finished has no
//     free slot (that record is neither durable yet nor safe to lose):
//     the redirect waits for that sync, then decides.
//   - Readers of the data files hold the chunk locks of what they read
//     shared (once the volume has ever redirected), and every redirect's
//     data write and every punch of an old slot hold them exclusively: a
//     reader that chose a slot reads it whole, never half of an in-place
//     overwrite nor a slot punched or rewritten under it.
//   - A volume that stops being primary settles everything first, so a
//     replica never holds unsettled redirects.
//
// The checkpoint persists the slot bits (slots file, written atomically)
// before the superblock; a slots file newer than the superblock's
// checkpoint is harmless, since replaying a Redirect again is idempotent.
// Once a chunk's slot is persisted and nothing is pending, its other slot
// goes on a punch backlog, given back later (redirect_slots.go says when).
//
// This file has the state, the write path and the settles;
// redirect_slots.go the persistence of the slot bits and the punches;
// redirect_recovery.go recovery's decisions and catch-up's reading back.

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

// File names of the redirect state (see the top of this file).
const (
	ShadowFile = "shadow"
	SlotsFile  = "slots"
)

const (
	redirChunk = 64 << 10  // slot granularity
	redirMin   = 128 << 10 // smaller writes go through the WAL
	nChunkLock = 256
)

// slotState is the redirect state of a volume. cur is read by every
// reader (atomics); the rest is under mu.
type slotState struct {
	chunk  int64
	cshift uint
	off    bool // Options.NoRedirect

	active atomic.Bool     // some chunk is in slot 1 or has pending redirects
	cur    []atomic.Uint64 // bit per chunk: the slot reads use (replaced only under Drain)
	locks  [nChunkLock]sync.RWMutex
	// regMu orders in-place overwrites against the WAL sync's choice of
	// LSN (see the top of the file). Under it: syncingLSN, the highest
	// LSN a sync has chosen to make durable (a redirect of a chunk whose
	// newest record lies between the durable LSN and it waits for that
	// sync), and overwrites, the (X, Y) pairs.
	regMu      sync.Mutex
	syncingLSN uint64
	overwrites []overwrite

	npending   atomic.Int64  // pending redirect records
	pendBytes  atomic.Int64  // data bytes of pending redirect records
	pendChunks atomic.Int64  // chunks with pending redirects: len(pending)
	maxPendLSN atomic.Uint64 // newest pending redirect
	trustLSN   atomic.Uint64 // the superblock's persisted DurableLSN
	// trustCap (non-zero): DurableLSN may not be persisted above it, as
	// recovery discarded the redirect after it, which is still in the log
	// until the checkpoint passes it (Open does that before any I/O).
	trustCap atomic.Uint64
	unsynced atomic.Bool // redirect data written since the last data sync

	mu        sync.Mutex
	persisted []uint64               // slot bits as of the persisted checkpoint
	pending   map[uint64][]pendRedir // chunk -> redirects after the checkpoint, LSN order
	staged    []uint64               // persisted bits being written (stageSlots..commitSlots)
	stagedLSN uint64
	// The punch backlog: chunks whose other slot holds nothing anyone
	// needs, oldest first (see queuePunchLocked).
	punch    []uint64
	queued   []uint64     // bit per chunk: on punch (a bitmap: a map cost ~50 bytes a chunk)
	punchDiv atomic.Int64 // tests: the backlog's bound is size/punchDiv (0: punchBacklogDiv)
	pendMax  atomic.Int64 // tests: pendBytes that call for a checkpoint (0: redirectsDue's limits)
	direct   bool         // Options.DirectIO: writeSlot tries O_DIRECT
}

// overwrite: record y overwrote record x's data in place; no sync may
// cover x without y.
type overwrite struct{ x, y uint64 }

type pendRedir struct {
	lsn, pos uint64
	slot     uint8
	bytes    int64 // data bytes of the whole record, counted on its first chunk
}

func (s *slotState) chunkOf(b uint64, bshift uint) uint64 { return b >> (s.cshift - bshift) }

func (s *slotState) slot(c uint64) uint8 {
	if int(c/64) >= len(s.cur) {
		return 0
	}
	return uint8(s.cur[c/64].Load()>>(c%64)) & 1
}

func (s *slotState) setCur(c uint64, slot uint8) {
	w := &s.cur[c/64]
	for {
		o := w.Load()
		n := o&^(1<<(c%64)) | uint64(slot)<<(c%64)
		if o == n || w.CompareAndSwap(o, n) {
			return
		}
	}
}

func bit(bits []uint64, c uint64) uint8 {
	if int(c/64) >= len(bits) {
		return 0
	}
	return uint8(bits[c/64]>>(c%64)) & 1
}

func setBit(bits []uint64, c uint64, slot uint8) {
	bits[c/64] = bits[c/64]&^(1<<(c%64)) | uint64(slot)<<(c%64)
}

// durableSlotLocked is the slot of chunk c that no crash may lose (see the
// top of the file). Caller holds mu. The chunk's pending list is in LSN
// order; a client that never flushes rewrites a chunk many times between
// checkpoints, so the newest entry at or below durLSN is found by binary
// search, not by a walk from the end.
func (s *slotState) durableSlotLocked(c uint64, durLSN uint64) uint8 {
	p := s.pending[c]
	if i := sort.Search(len(p), func(i int) bool { return p[i].lsn > durLSN }); i > 0 {
		return p[i-1].slot
	}
	return bit(s.persisted, c)
}

func (v *Volume) dataFile(slot uint8) vfs.File {
	if slot == 1 {
		return v.shF
	}
	return v.extF
}

// writeSlot writes a redirect's data into a slot's file; with
// Options.DirectIO around the page cache when the file and the buffer
// allow it (vfs.DirectWriter): the data is written once, by the device,
// not copied into the page cache first. The durability is the same: a
// flush syncs the data files.
func (v *Volume) writeSlot(slot uint8, p []byte, off int64) error {
	f := v.dataFile(slot)
	if d, ok := f.(vfs.DirectWriter); ok && v.slots.direct {
		n, err := d.WriteAtDirect(p, off)
		if !errors.Is(err, vfs.ErrNoDirect) {
			if err == nil && n < len(p) {
				err = io.ErrShortWrite
			}
			if err == nil {
				v.stats.redirectDirect.Add(uint64(n))
			}
			return err
		}
	}
	_, err := f.WriteAt(p, off)
	return err
}

// writeSlotRetry is writeSlot, retried when the disk is full: the space
// the write needs may be the volume's own old slots (redirect_slots.go).
// It punches the backlog, and when that is empty it waits (boundedly)
// for a checkpoint, which turns pending chunks into punchable ones. The
// caller holds the chunk locks of the range, so none of its own chunks
// is punched under it, and the range has no dirty block, so the
// checkpoint does not wait for it.
func (v *Volume) writeSlotRetry(slot uint8, p []byte, off int64) error {
	s := &v.slots
	for attempt := 0; ; attempt++ {
		err := v.writeSlot(slot, p, off)
		if err == nil || !isNoSpace(err) || attempt == diskFullRetries {
			return err
		}
		s.mu.Lock()
		punch := s.takePunchLocked(len(s.punch))
		s.mu.Unlock()
		v.log.Warn("engine_redirect_disk_full", "offset", off, "length", len(p), "attempt", attempt+1,
			"punching_old_slots", len(punch), "err", err)
		if len(punch) > 0 {
			v.punchOldSlots(punch)
			continue
		}
		ck := v.ckptLSN.Load()
		v.kick()
		for t0 := time.Now(); v.ckptLSN.Load() == ck && time.Since(t0) < time.Second && v.failErr() == nil; {
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// diskFullRetries bounds writeSlotRetry's attempts after the first.
const diskFullRetries = 4

// slotRuns calls fn for each run of [off, off+n) whose chunks are in the
// same slot, in order.
func (v *Volume) slotRuns(off, n int64, fn func(f vfs.File, off, n int64) error) error {
	s := &v.slots
	if !s.active.Load() {
		return fn(v.extF, off, n)
	}
	end := off + n
	for off < end {
		c := uint64(off >> s.cshift)
		sl := s.slot(c)
		e := int64(c+1) << s.cshift
		for e < end && s.slot(uint64(e>>s.cshift)) == sl {
			e += s.chunk
		}
		e = min(e, end)
		if err := fn(v.dataFile(sl), off, e-off); err != nil {
			return err
		}
		off = e
	}
	return nil
}

// chunkLocks visits the chunk locks of [off, off+n) once each in ascending
// order (the lock order).
func (s *slotState) chunkLocks(off, n int64, fn func(*sync.RWMutex)) {
	c0 := uint64(off >> s.cshift)
	c1 := uint64((off + n - 1) >> s.cshift)
	if c1-c0+1 >= nChunkLock {
		for i := range s.locks {
			fn(&s.locks[i])
		}
		return
	}
	var seen [nChunkLock / 64]uint64
	for c := c0; c <= c1; c++ {
		i := c % nChunkLock
		seen[i/64] |= 1 << (i % 64)
	}
	for w, bits := range seen {
		for ; bits != 0; bits &= bits - 1 {
			fn(&s.locks[w*64+bits0(bits)])
		}
	}
}

// readData reads the volume's data (not the WAL) at off: each chunk from
// its slot.
func (v *Volume) readData(p []byte, off int64) error {
	s := &v.slots
	if !s.active.Load() {
		// No chunk was ever redirected: all data is in the extent.
		if n, err := v.extF.ReadAt(p, off); err != nil && n < len(p) {
			return fmt.Errorf("read extent at %d: %w", off, err)
		}
		return nil
	}
	// The slots are chosen, and read, under the chunk locks.
	s.chunkLocks(off, int64(len(p)), func(l *sync.RWMutex) { l.RLock() })
	defer s.chunkLocks(off, int64(len(p)), func(l *sync.RWMutex) { l.RUnlock() })
	return v.slotRuns(off, int64(len(p)), func(f vfs.File, o, n int64) error {
		q := p[o-off : o-off+n]
		if m, err := f.ReadAt(q, o); err != nil && m < len(q) {
			return fmt.Errorf("read extent at %d: %w", o, err)
		}
		return nil
	})
}

// writeData writes p at off into each chunk's current slot (the flusher
// and base transfers).
func (v *Volume) writeData(p []byte, off int64) error {
	return v.slotRuns(off, int64(len(p)), func(f vfs.File, o, n int64) error {
		_, err := f.WriteAt(p[o-off:o-off+n], o)
		return err
	})
}

// punchData deallocates [off, off+n) in each chunk's current slot.
func (v *Volume) punchData(off, n int64) error {
	return v.slotRuns(off, n, func(f vfs.File, o, l int64) error { return f.PunchHole(o, l) })
}

// allocatedData lists the allocated ranges of [off, off+n), each chunk
// asked of its slot.
func (v *Volume) allocatedData(off, n int64) ([]vfs.Range, error) {
	var out []vfs.Range
	err := v.slotRuns(off, n, func(f vfs.File, o, l int64) error {
		rs, err := f.Allocated(o, l)
		for _, r := range rs {
			if k := len(out); k > 0 && out[k-1].Off+out[k-1].Len == r.Off {
				out[k-1].Len += r.Len
				continue
			}
			out = append(out, r)
		}
		return err
	})
	return out, err
}

// syncData fdatasyncs both data files.
func (v *Volume) syncData() error {
	if err := v.extF.Sync(); err != nil {
		return err
	}
	if v.slots.active.Load() || v.slots.unsynced.Load() {
		return v.shF.Sync()
	}
	return nil
}

// redirectable reports whether a write of n bytes at off (stripes held)
// takes the redirect path.
func (v *Volume) redirectable(off int64, n int) bool {
	s := &v.slots
	if s.off || n < redirMin || off&(s.chunk-1) != 0 || int64(n)&(s.chunk-1) != 0 {
		return false
	}
	// At most what one WAL record may carry: replicas take the write as
	// one Write record in a log of the same size.
	if n > v.maxRecordPayload() || wal.RedirectPayloadLen(uint32(n), uint32(s.chunk)) > wal.MaxRedirectPayload || v.latestSnap() != nil {
		return false
	}
	first := uint64(off >> v.bshift)
	nb := uint64(int64(n) >> v.bshift)
	if v.zeros.n.Load() != 0 && v.zeros.overlaps(first, first+nb) {
		return false
	}
	if v.dirty.len() != 0 {
		for b := first; b < first+nb; b++ {
			if _, ok := v.dirty.get(b); ok {
				return false
			}
		}
	}
	return true
}

// writeRedirect writes p at off (chunk-aligned, stripes held) once, into
// each chunk's free slot, and logs a Redirect record. Replicas and the
// record feed get an ordinary Write record with the data.
func (v *Volume) writeRedirect(p []byte, off int64) (uint64, error) {
	s := &v.slots
	n := uint32(len(p))
	pl := wal.RedirectPayloadLen(n, uint32(s.chunk))
	bp := getBuf(pl)
	defer putBuf(bp)
	payload := *bp
	c0 := uint64(off >> s.cshift)
	nc := int(int64(n) >> s.cshift)
	slots := make([]uint8, nc)
	rec := wal.Record{Type: wal.Redirect, Offset: off, Length: uint32(pl), Payload: payload}
	feed := wal.Record{Type: wal.Write, Offset: off, Length: n, Payload: p}
	inPlace := false
	hook := recordHook{
		feedAs: &feed,
		before: func(lsn uint64, pl []byte) error {
			// The LSN is reserved; choose the slots and write the data.
			s.regMu.Lock()
			dur := v.durLSN.Load()
			for {
				// A chunk whose newest redirect a running sync chose but
				// did not finish has no slot free: wait for that sync.
				var busy uint64
				s.mu.Lock()
				for i := range slots {
					if p := s.pending[c0+uint64(i)]; len(p) > 0 {
						if x := p[len(p)-1].lsn; x > dur && x <= s.syncingLSN {
							busy = max(busy, x)
						}
					}
				}
				s.mu.Unlock()
				if busy == 0 {
					break
				}
				s.regMu.Unlock()
				if err := v.syncWAL(busy); err != nil {
					return err
				}
				s.regMu.Lock()
				dur = v.durLSN.Load()
			}
			over := ^uint64(0)
			s.mu.Lock()
			for i := range slots {
				c := c0 + uint64(i)
				slots[i] = 1 - s.durableSlotLocked(c, dur)
				if slots[i] == s.slot(c) {
					inPlace = true
					if p := s.pending[c]; len(p) > 0 {
						over = min(over, p[len(p)-1].lsn)
					}
				}
			}
			s.mu.Unlock()
			if over != ^uint64(0) {
				s.overwrites = append(s.overwrites, overwrite{x: over, y: lsn})
			}
			s.regMu.Unlock()
			wal.EncodeRedirect(pl, p, uint32(s.chunk), slots)
			if v.trace != nil {
				v.trace("redirect chunks %d+%d slots %v inplace %v dur %d", c0, nc, slots, inPlace, dur)
			}
			s.chunkLocks(off, int64(n), func(l *sync.RWMutex) { l.Lock() })
			var err error
			for i := 0; i < nc && err == nil; {
				j := i + 1
				for j < nc && slots[j] == slots[i] {
					j++
				}
				o := int64(i) << s.cshift
				err = v.writeSlotRetry(slots[i], p[o:int64(j)<<s.cshift], off+o)
				i = j
			}
			s.unsynced.Store(true)
			s.chunkLocks(off, int64(n), func(l *sync.RWMutex) { l.Unlock() })
			return err
		},
		applied: func(r wal.Record, pos uint64) {
			v.redirectApplied(c0, slots, r.LSN, pos, int64(n))
		},
		done: func() {},
	}
	return v.appendRecordWith(rec, false, &hook)
}

// chooseSyncLSN picks what a WAL sync makes durable: every complete
// record, but never an overwritten record without the one that overwrote
// it (it waits for that one to complete). It publishes the choice for
// redirects deciding meanwhile.
func (v *Volume) chooseSyncLSN() (uint64, uint64, error) {
	s := &v.slots
	c := &v.comp
	for {
		s.regMu.Lock()
		lsn, end := c.get()
		var wait uint64
		keep := s.overwrites[:0]
		for _, o := range s.overwrites {
			if o.y <= lsn {
				continue // complete: covered together from now on
			}
			keep = append(keep, o)
			if o.x <= lsn {
				wait = max(wait, o.y)
			}
		}
		clear(s.overwrites[len(keep):])
		s.overwrites = keep
		if wait == 0 {
			s.syncingLSN = max(s.syncingLSN, lsn)
			s.regMu.Unlock()
			return lsn, end, nil
		}
		s.regMu.Unlock()
		c.mu.Lock()
		for c.done < wait && v.failed.Load() == nil {
			c.cond.Wait()
		}
		c.mu.Unlock()
		if err := v.failErr(); err != nil {
			return 0, 0, err
		}
	}
}

// redirectApplied makes a logged redirect visible: pending first, then
// the slot bits readers use.
func (v *Volume) redirectApplied(c0 uint64, slots []uint8, lsn, pos uint64, bytes int64) {
	s := &v.slots
	s.mu.Lock()
	for i, sl := range slots {
		c := c0 + uint64(i)
		pr := pendRedir{lsn: lsn, pos: pos, slot: sl}
		if i == 0 {
			pr.bytes = bytes
		}
		if len(s.pending[c]) == 0 {
			s.pendChunks.Add(1)
		}
		s.pending[c] = append(s.pending[c], pr)
	}
	s.npending.Add(1)
	s.pendBytes.Add(bytes)
	if lsn > s.maxPendLSN.Load() {
		s.maxPendLSN.Store(lsn)
	}
	s.active.Store(true)
	for i, sl := range slots {
		s.setCur(c0+uint64(i), sl)
	}
	s.mu.Unlock()
	if v.redirectsDue() {
		v.kick()
	}
}

// settleRange makes sure no chunk of blocks [first, first+n) has a
// redirect that the persisted DurableLSN does not cover, before a small
// write or a zero range goes there (see the top of the file).
func (v *Volume) settleRange(first, n uint64) error {
	s := &v.slots
	if s.npending.Load() == 0 || s.maxPendLSN.Load() <= s.trustLSN.Load() {
		return nil
	}
	trust := s.trustLSN.Load()
	c0 := s.chunkOf(first, v.bshift)
	c1 := s.chunkOf(first+n-1, v.bshift)
	var need uint64
	s.mu.Lock()
	if c1-c0 < uint64(len(s.pending)) {
		for c := c0; c <= c1; c++ {
			if p := s.pending[c]; len(p) > 0 && p[len(p)-1].lsn > trust {
				need = max(need, p[len(p)-1].lsn)
			}
		}
	} else {
		for c, p := range s.pending {
			if c >= c0 && c <= c1 && len(p) > 0 && p[len(p)-1].lsn > trust {
				need = max(need, p[len(p)-1].lsn)
			}
		}
	}
	s.mu.Unlock()
	if need == 0 {
		return nil
	}
	return v.settle(need)
}

// settle makes every record up to lsn durable and persists DurableLSN.
func (v *Volume) settle(lsn uint64) error {
	if err := v.syncWAL(lsn); err != nil {
		return err
	}
	v.superMu.Lock()
	defer v.superMu.Unlock()
	d := v.slots.capTrust(v.durLSN.Load())
	if d <= v.sb.DurableLSN {
		v.slots.trustLSN.Store(max(v.slots.trustLSN.Load(), v.sb.DurableLSN))
		return nil
	}
	old := v.sb.DurableLSN
	v.sb.DurableLSN = d
	if err := v.persistSuperblock(); err != nil {
		v.sb.DurableLSN = old
		return ioError(fmt.Errorf("persist durable LSN %d: %w", d, err))
	}
	v.slots.trustLSN.Store(d)
	v.stats.redirectSettles.Add(1)
	if v.trace != nil {
		v.trace("settle lsn=%d durable=%d", lsn, d)
	}
	return nil
}

// settleAll settles every pending redirect (a volume leaving the primary
// role).
func (v *Volume) settleAll() error {
	s := &v.slots
	if m := min(s.maxPendLSN.Load(), v.headLSN.Load()); s.npending.Load() > 0 && m > s.trustLSN.Load() {
		return v.settle(m)
	}
	return nil
}
