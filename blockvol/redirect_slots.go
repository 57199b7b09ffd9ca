package blockvol

// The redirect state's persistence (see redirect.go): the shadow file
// and the slots file, staged before each checkpoint's superblock and
// committed after it, and the punch of slots no longer used.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

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
		return v.queueLeftoverSlots()
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
	return v.queueLeftoverSlots()
}

// queueLeftoverSlots puts every chunk whose other slot may still hold
// data on the punch backlog: a crash, or a stop, can come before an old
// slot is punched. For a chunk in slot 1 that is its extent range; for a
// chunk in slot 0, its shadow range where the shadow has data at all.
// Recovery may then make some of them pending again; the punch checks
// that when it runs.
func (v *Volume) queueLeftoverSlots() error {
	s := &v.slots
	limit := v.limit.Load()
	nchunks := uint64((limit + s.chunk - 1) >> s.cshift)
	// The extent under each run of slot-1 chunks (few: only large writes
	// flip chunks), then the shadow under slot-0 chunks.
	for c := uint64(0); c < nchunks; {
		if c%64 == 0 && s.persisted[c/64] == 0 {
			c += 64
			continue
		}
		if bit(s.persisted, c) == 0 {
			c++
			continue
		}
		e := c
		for e < nchunks && bit(s.persisted, e) == 1 {
			e++
		}
		v.queueLeftoversIn(v.extF, 1, int64(c)<<s.cshift, min(int64(e)<<s.cshift, limit))
		c = e
	}
	v.queueLeftoversIn(v.shF, 0, 0, limit)
	return nil
}

// queueLeftoversIn queues the chunks of [from, to) in slot `in`
// (persisted) that have data in f, the data file of the other slot. A
// failure only costs space: it is logged, and the volume opens.
func (v *Volume) queueLeftoversIn(f vfs.File, in uint8, from, to int64) {
	s := &v.slots
	data, err := f.Allocated(from, to-from)
	if err != nil {
		v.log.Warn("engine_redirect_slot_scan_failed", "slot", 1-in, "err", err,
			"effect", "old slots there keep their space until rewritten")
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range data {
		for c := uint64(r.Off >> s.cshift); c <= uint64((r.Off+r.Len-1)>>s.cshift); c++ {
			if bit(s.persisted, c) == in {
				s.queuePunchLocked(c)
			}
		}
	}
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
			s.pendChunks.Add(-1)
			s.queuePunchLocked(c)
		} else {
			s.pending[c] = append(p[:0:0], p[k:]...)
		}
	}
	s.npending.Add(-pruned)
	s.pendBytes.Add(-bytes)
	s.mu.Unlock()
}

// Old slots are not punched at once. A chunk rewritten by large writes
// flips between its two slots, and a flip into a punched slot makes the
// filesystem allocate (and, mounted with discard, the punch itself sends
// a discard to the device): under a stream of 1 MiB overwrites, punching
// at every checkpoint cost a third of the server's CPU. So the punches
// wait in a backlog. The flusher's tick (punchDue) gives it back, in
// batches outside any checkpoint, when the volume is idle, and whenever
// the backlog passes a quarter of the volume's size: then the newest
// entries go first, down to three quarters of that bound, because under
// cyclic overwrites the chunk written last is the one rewritten last.
// Close punches a bounded part (the Open scan finds the rest), and a
// large write that finds the disk full punches the backlog and tries
// once more (writeSlotRetry). The space a volume may use beyond its data
// while large writes keep coming is therefore a quarter of its size, plus
// the chunks of redirects not yet checkpointed (redirectsDue).
const punchBacklogDiv = 4

// closePunchMax bounds Close's share of the backlog (256 MiB of 64 KiB
// chunks, well under a second): a large backlog must not hold up a stop.
const closePunchMax = 4 * punchIdleBatch

// queuePunchLocked adds chunk c to the punch backlog once. Caller holds mu.
func (s *slotState) queuePunchLocked(c uint64) {
	w := int(c / 64)
	if w >= len(s.queued) {
		s.queued = append(s.queued, make([]uint64, w+1-len(s.queued))...)
	}
	if s.queued[w]&(1<<(c%64)) != 0 {
		return
	}
	s.queued[w] |= 1 << (c % 64)
	s.punch = append(s.punch, c)
}

// takePunchLocked removes the newest n chunks of the backlog and returns
// them. Caller holds mu.
func (s *slotState) takePunchLocked(n int) []uint64 {
	n = min(n, len(s.punch))
	out := append([]uint64(nil), s.punch[len(s.punch)-n:]...)
	s.punch = s.punch[:len(s.punch)-n]
	for _, c := range out {
		s.queued[c/64] &^= 1 << (c % 64)
	}
	return out
}

// overBoundLocked is how many chunks of the backlog should be punched
// now for a volume of size bytes: none up to the bound (see
// punchBacklogDiv; tests may set punchDiv), else down to three quarters
// of it. Caller holds mu.
func (s *slotState) overBoundLocked(size int64) int {
	div := int64(punchBacklogDiv)
	if d := s.punchDiv.Load(); d > 0 {
		div = d
	}
	bound := max(int(size/div>>s.cshift), 1)
	if len(s.punch) <= bound {
		return 0
	}
	return len(s.punch) - bound*3/4
}

// punchIdleBatch is one batch of the flusher's punches: flushMu is held
// per batch, so a Drain (or a checkpoint) waits for one batch at most.
const punchIdleBatch = 1024

// punchDue is the flusher's share of the backlog on each tick: one batch
// when the volume is idle, and what passes the bound, batch by batch.
func (v *Volume) punchDue(idle bool) {
	s := &v.slots
	if idle {
		v.punchBatch(func() []uint64 { return s.takePunchLocked(punchIdleBatch) })
	}
	s.mu.Lock()
	over := s.overBoundLocked(v.limit.Load())
	s.mu.Unlock()
	// Busy chunks go back on the backlog: the number of batches is fixed
	// up front so that they cannot keep this loop going.
	for n := (over + punchIdleBatch - 1) / punchIdleBatch; n > 0; n-- {
		if !v.punchBatch(func() []uint64 { return s.takePunchLocked(min(s.overBoundLocked(v.limit.Load()), punchIdleBatch)) }) {
			break
		}
	}
}

// punchBatch punches the chunks take returns (called with mu held), under
// flushMu: Drain and Expand (growSlots) must not find a punch running.
// It reports whether there was anything to punch.
func (v *Volume) punchBatch(take func() []uint64) bool {
	v.flushMu.Lock()
	defer v.flushMu.Unlock()
	s := &v.slots
	s.mu.Lock()
	punch := take()
	s.mu.Unlock()
	if len(punch) == 0 {
		return false
	}
	v.punchOldSlots(punch)
	return true
}

// punchBacklog punches up to n chunks of the backlog (Close, after the
// flusher stopped).
func (v *Volume) punchBacklog(n int) {
	s := &v.slots
	s.mu.Lock()
	punch := s.takePunchLocked(n)
	s.mu.Unlock()
	if len(punch) > 0 {
		v.punchOldSlots(punch)
	}
}

// punchOldSlots gives back the space of the slot a chunk no longer uses,
// for chunks with nothing pending whose writers are not busy (stripes
// taken with TryLock: the flusher never waits for a writer). Busy ones
// go back on the backlog; chunks redirected again since they were queued
// are dropped (their next checkpoint queues them again).
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
		for _, c := range retry {
			s.queuePunchLocked(c)
		}
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
		s.queuePunchLocked(c)
	}
	clear(s.pending)
	s.persisted, s.staged = s.staged, nil
	s.npending.Store(0)
	s.pendBytes.Store(0)
	s.pendChunks.Store(0)
	s.mu.Unlock()
}

// redirectsDue reports whether pending redirects should be checkpointed
// now. A checkpoint fdatasyncs the data files, so checkpointing often
// turns a stream of large writes that the client never flushes into
// writeback at disk speed, which a plain NBD server over a file never
// does. Two things bound how long they may wait:
//   - recovery's work: it reads back and checks the newest redirect of
//     each chunk that the persisted DurableLSN does not cover (older ones
//     only where a newer one fails; a flush syncs the WAL but does not
//     persist DurableLSN, so flushed redirects are checked too), so the
//     chunks with pending redirects may hold at most redirectPendingMax
//     (or half the WAL if that is more): about 3 s of reading for 1 GiB
//     on a 350 MB/s disk. They are also the space the volume uses twice;
//   - the pending map's memory: one entry (about 40 bytes) per chunk per
//     write, so the writes' bytes, rewrites counted again, may reach
//     redirectRewriteMax times that (16 GiB with WALs up to 2 GiB: about
//     10 MiB of entries). durableSlotLocked finds its entry in a chunk's
//     list by binary search, so long lists cost writes little.
func (v *Volume) redirectsDue() bool {
	s := &v.slots
	if m := s.pendMax.Load(); m > 0 {
		return s.pendBytes.Load() >= m
	}
	limit := max(int64(flushHighWater(v.walSize)), redirectPendingMax)
	return s.pendChunks.Load()<<s.cshift > limit || s.pendBytes.Load() >= limit*redirectRewriteMax
}

const (
	redirectPendingMax = 1 << 30
	redirectRewriteMax = 16
)
