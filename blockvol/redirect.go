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
// Once a chunk's slot is persisted and nothing is pending, the flusher
// punches the other slot to give its space back.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

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
	punch     []uint64 // chunks whose other slot holds nothing anyone needs
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
// top of the file). Caller holds mu.
func (s *slotState) durableSlotLocked(c uint64, durLSN uint64) uint8 {
	p := s.pending[c]
	for i := len(p) - 1; i >= 0; i-- {
		if p[i].lsn <= durLSN {
			return p[i].slot
		}
	}
	return bit(s.persisted, c)
}

// openSlots opens (creating when missing: volumes made before redirects
// existed have none) the shadow file and loads the slots file.
func (v *Volume) openSlots(noRedirect bool) error {
	s := &v.slots
	s.chunk = max(redirChunk, v.bs)
	for 1<<s.cshift < s.chunk {
		s.cshift++
	}
	s.off = noRedirect
	s.pending = make(map[uint64][]pendRedir)
	name := filepath.Join(v.dir, ShadowFile)
	f, err := v.fs.OpenFile(name, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		if f, err = v.fs.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644); err == nil {
			err = v.fs.SyncDir(v.dir)
		}
	}
	if err != nil {
		return fmt.Errorf("open shadow file: %w", err)
	}
	v.shF = f
	limit := v.limit.Load()
	if err := v.shF.Truncate(limit); err != nil {
		return fmt.Errorf("size shadow file: %w", err)
	}
	words := v.slotWords(limit)
	s.persisted = make([]uint64, words)
	s.cur = make([]atomic.Uint64, words)
	b, err := vfs.ReadFile(v.fs, filepath.Join(v.dir, SlotsFile))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("read slots file: %w", err)
	}
	bits, lsn, err := decodeSlots(b, s.chunk)
	if err != nil {
		return fmt.Errorf("%w: slots file: %v", ErrCorrupt, err)
	}
	// lsn is the checkpoint it was written with; checkpoints that cover
	// no redirect leave the file as it is, so it may be older.
	copy(s.persisted, bits)
	any := false
	for i, w := range s.persisted {
		s.cur[i].Store(w)
		any = any || w != 0
	}
	s.active.Store(any)
	s.stagedLSN = lsn
	return nil
}

func (v *Volume) slotWords(size int64) int {
	chunks := (size + v.slots.chunk - 1) >> v.slots.cshift
	return int((chunks + 63) / 64)
}

// growSlots makes room for a larger size (inside Drain).
func (v *Volume) growSlots(size int64) {
	s := &v.slots
	words := v.slotWords(size)
	if words <= len(s.cur) {
		return
	}
	cur := make([]atomic.Uint64, words)
	for i := range s.cur {
		cur[i].Store(s.cur[i].Load())
	}
	s.cur = cur
	s.mu.Lock()
	s.persisted = append(s.persisted, make([]uint64, words-len(s.persisted))...)
	s.mu.Unlock()
}

// The slots file: magic, version, chunk size, LSN, bitmap length and a
// CRC32C over everything before it, then the bitmap (little endian words).
var slotsMagic = [8]byte{'B', 'L', 'K', 'D', 'S', 'L', 'O', 'T'}

const slotsHeader = 32

func encodeSlots(bits []uint64, chunk int64, lsn uint64) []byte {
	b := make([]byte, slotsHeader+8*len(bits))
	copy(b, slotsMagic[:])
	le := binary.LittleEndian
	le.PutUint32(b[8:], 1)
	le.PutUint32(b[12:], uint32(chunk))
	le.PutUint64(b[16:], lsn)
	le.PutUint32(b[24:], uint32(len(bits)))
	for i, w := range bits {
		le.PutUint64(b[slotsHeader+8*i:], w)
	}
	le.PutUint32(b[28:], wal.Checksum(append(b[:28:28], b[slotsHeader:]...)))
	return b
}

func decodeSlots(b []byte, chunk int64) ([]uint64, uint64, error) {
	le := binary.LittleEndian
	if len(b) < slotsHeader || [8]byte(b[:8]) != slotsMagic || le.Uint32(b[8:]) != 1 {
		return nil, 0, errors.New("bad magic or version")
	}
	if c := le.Uint32(b[12:]); int64(c) != chunk {
		return nil, 0, fmt.Errorf("chunk size %d, volume uses %d", c, chunk)
	}
	n := int(le.Uint32(b[24:]))
	if len(b) != slotsHeader+8*n {
		return nil, 0, fmt.Errorf("%d bytes for %d words", len(b), n)
	}
	if le.Uint32(b[28:]) != wal.Checksum(append(append([]byte(nil), b[:28]...), b[slotsHeader:]...)) {
		return nil, 0, errors.New("CRC mismatch")
	}
	bits := make([]uint64, n)
	for i := range bits {
		bits[i] = le.Uint64(b[slotsHeader+8*i:])
	}
	return bits, le.Uint64(b[16:]), nil
}

func (v *Volume) dataFile(slot uint8) vfs.File {
	if slot == 1 {
		return v.shF
	}
	return v.extF
}

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
				_, err = v.dataFile(slots[i]).WriteAt(p[o:int64(j)<<s.cshift], off+o)
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
	if s.pendBytes.Load() >= int64(flushHighWater(v.walSize)) {
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

// stageSlots computes the slot bits as of LSN target (every pending
// redirect up to it applied) and writes the slots file, marked fileLSN
// (the checkpoint LSN it goes with), before the checkpoint that covers
// target is persisted. It does nothing when no pending redirect is that
// old.
func (v *Volume) stageSlots(target, fileLSN uint64) error {
	s := &v.slots
	if s.npending.Load() == 0 {
		return nil
	}
	s.mu.Lock()
	var bits []uint64
	for c, p := range s.pending {
		for _, r := range p {
			if r.lsn > target {
				break
			}
			if bits == nil {
				bits = append([]uint64(nil), s.persisted...)
			}
			setBit(bits, c, r.slot)
		}
	}
	s.mu.Unlock()
	if bits == nil {
		return nil
	}
	if err := vfs.WriteFileAtomic(v.fs, filepath.Join(v.dir, SlotsFile), encodeSlots(bits, s.chunk, fileLSN), 0o644); err != nil {
		return fmt.Errorf("write slots file: %w", err)
	}
	s.mu.Lock()
	s.staged, s.stagedLSN = bits, fileLSN
	s.mu.Unlock()
	return nil
}

// commitSlots runs after the checkpoint at target is persisted: the
// staged bits become the persisted ones and the redirects up to target
// stop being pending. Chunks left with nothing pending have their other
// slot punched (space only: nothing reads it).
func (v *Volume) commitSlots(target uint64) {
	s := &v.slots
	s.mu.Lock()
	if s.staged == nil || s.stagedLSN != target {
		s.mu.Unlock()
		return
	}
	s.persisted, s.staged = s.staged, nil
	if v.trace != nil {
		v.trace("commit slots target=%d persisted=%x", target, s.persisted)
	}
	var pruned, bytes int64
	for c, p := range s.pending {
		k := 0
		for k < len(p) && p[k].lsn <= target {
			if p[k].bytes > 0 {
				pruned++
				bytes += p[k].bytes
			}
			k++
		}
		if k == 0 {
			continue
		}
		if k == len(p) {
			delete(s.pending, c)
			s.punch = append(s.punch, c)
		} else {
			s.pending[c] = append(p[:0:0], p[k:]...)
		}
	}
	s.npending.Add(-pruned)
	s.pendBytes.Add(-bytes)
	punch := s.punch
	s.punch = nil
	s.mu.Unlock()
	v.punchOldSlots(punch)
}

// punchOldSlots gives back the space of the slot a chunk no longer uses,
// for chunks with nothing pending whose writers are not busy (stripes
// taken with TryLock: the flusher never waits for a writer). Busy ones
// are retried after the next checkpoint.
func (v *Volume) punchOldSlots(chunks []uint64) {
	s := &v.slots
	var retry []uint64
	per := uint64(s.chunk >> v.bshift)
	for _, c := range chunks {
		first := c * per
		cl := &s.locks[c%nChunkLock]
		if !v.tryLockStripes(first, per) {
			retry = append(retry, c)
			continue
		}
		if !cl.TryLock() {
			v.unlockStripes(first, per)
			retry = append(retry, c)
			continue
		}
		s.mu.Lock()
		idle := len(s.pending[c]) == 0 && s.slot(c) == bit(s.persisted, c)
		s.mu.Unlock()
		if idle {
			other := 1 - s.slot(c)
			if v.trace != nil {
				v.trace("punch chunk %d slot %d", c, other)
			}
			if err := v.dataFile(other).PunchHole(int64(c)<<s.cshift, s.chunk); err != nil {
				v.log.Warn("engine_redirect_punch_failed", "chunk", c, "slot", other, "err", err)
			}
		}
		cl.Unlock()
		v.unlockStripes(first, per)
	}
	if len(retry) > 0 {
		s.mu.Lock()
		s.punch = append(s.punch, retry...)
		s.mu.Unlock()
	}
}

// foldAllSlots persists every pending redirect as the slot state at LSN
// lsn (ReplResetHead: everything complete is checkpointed).
func (v *Volume) foldAllSlots(lsn uint64) error {
	s := &v.slots
	if s.npending.Load() == 0 {
		return nil
	}
	return v.stageSlots(^uint64(0), lsn)
}

// commitAllSlots is commitSlots for foldAllSlots.
func (v *Volume) commitAllSlots(lsn uint64) {
	s := &v.slots
	s.mu.Lock()
	if s.staged == nil {
		s.mu.Unlock()
		return
	}
	for c := range s.pending {
		s.punch = append(s.punch, c)
	}
	clear(s.pending)
	s.persisted, s.staged = s.staged, nil
	s.npending.Store(0)
	s.pendBytes.Store(0)
	punch := s.punch
	s.punch = nil
	s.mu.Unlock()
	v.punchOldSlots(punch)
}

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

// redirectsDue reports whether pending redirects should be checkpointed
// now: they bound recovery's work (each unsettled one is read back and
// checked) and the memory of the pending map.
func (v *Volume) redirectsDue() bool {
	return v.slots.pendBytes.Load() >= int64(flushHighWater(v.walSize))
}
