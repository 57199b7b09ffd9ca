package blockvol

// Hooks for replication's base transfers (rebuild, resync, truncation of a
// divergent tail) and tests. Owned by replication/; they touch the
// engine's state only under its own locks.

import (
	"fmt"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

// ReplResetHead makes the volume's log continue at LSN lsn+1: every
// complete record is first checkpointed into the extent (so the dirty map
// and zero set are empty), then head, durable, checkpoint and tail LSNs
// are set to lsn and persisted with a new WAL generation, so that no
// record of the log's past can be replayed after the new head. Used by a
// replica before a base transfer: its data is then base data plus the
// records that follow, and replication keeps it marked untrusted until
// the transfer completes. lsn may be lower than the current head
// (truncation of a divergent tail) or higher (rebuild).
func (v *Volume) ReplResetHead(lsn uint64) error {
	v.ioMu.Lock()
	defer v.ioMu.Unlock()
	if v.closed.Load() {
		return fmt.Errorf("blockvol: reset head: %w", blockdev.ErrClosed)
	}
	if err := v.failErr(); err != nil {
		return fmt.Errorf("blockvol: reset head: %w", err)
	}
	v.flushMu.Lock()
	defer v.flushMu.Unlock()
	done, doneEnd := v.comp.get()
	if err := v.syncWAL(done); err != nil {
		return fmt.Errorf("blockvol: reset head: %w", err)
	}
	if err := v.applyToExtent(doneEnd, doneEnd); err != nil {
		return fmt.Errorf("blockvol: reset head: checkpoint: %w", ioError(err))
	}
	if err := v.syncData(); err != nil {
		return fmt.Errorf("blockvol: reset head: sync extent: %w", ioError(err))
	}
	if err := v.foldAllSlots(lsn); err != nil {
		return fmt.Errorf("blockvol: reset head: %w", ioError(err))
	}
	v.appendMu.Lock()
	defer v.appendMu.Unlock()
	head := v.head
	// Mark the space at the new head unwritten, so a scan never reads an
	// old record there as the continuation of the log.
	zpos := head
	if rem := v.ring.Remaining(zpos); rem < wal.HeaderSize {
		zpos += uint64(rem)
	}
	var zero [wal.HeaderSize]byte
	if _, err := v.walF.WriteAt(zero[:], v.ring.Phys(zpos)); err != nil {
		return fmt.Errorf("blockvol: reset head: %w", ioError(err))
	}
	if err := v.walF.Sync(); err != nil {
		return fmt.Errorf("blockvol: reset head: %w", ioError(err))
	}
	v.superMu.Lock()
	old := v.sb
	if v.sb.Gen == ^uint32(0) {
		v.superMu.Unlock()
		return fmt.Errorf("blockvol: reset head: %w: WAL generation exhausted", ErrCorrupt)
	}
	v.sb.Gen++
	v.sb.GenLSN = lsn + 1
	v.sb.CheckpointLSN, v.sb.CheckpointPos = lsn, head
	v.sb.TailLSN, v.sb.TailPos = lsn+1, head
	v.sb.DurableLSN = lsn
	if err := v.persistSuperblock(); err != nil {
		v.sb = old
		v.superMu.Unlock()
		return fmt.Errorf("blockvol: reset head: %w", ioError(err))
	}
	v.gen = v.sb.Gen
	v.superMu.Unlock()
	v.slots.trustLSN.Store(lsn)
	v.commitAllSlots(lsn)
	v.slots.regMu.Lock()
	v.slots.syncingLSN = lsn
	v.slots.overwrites = v.slots.overwrites[:0]
	v.slots.regMu.Unlock()
	v.slots.maxPendLSN.Store(0)
	v.nextLSN = lsn + 1
	v.headLSN.Store(lsn)
	v.index.reset(lsn+1, head)
	v.ckptLSN.Store(lsn)
	v.ckptPos.Store(head)
	v.tailLSN.Store(lsn + 1)
	v.tailPos.Store(head)
	v.gc.mu.Lock()
	v.gc.durLSN, v.gc.durEnd = lsn, head
	v.durLSN.Store(lsn)
	v.gc.mu.Unlock()
	v.comp.mu.Lock()
	v.comp.done, v.comp.doneEnd = lsn, head
	v.comp.doneA.Store(lsn)
	v.comp.mu.Unlock()
	close(v.spaceCh)
	v.spaceCh = make(chan struct{})
	v.log.Info("engine_repl_reset_head", "lsn", lsn, "pos", head, "gen", v.gen)
	return nil
}

// ReplWriteBase writes base data straight into the extent, bypassing the
// WAL. The caller (a replica's base transfer) guarantees that no record
// newer than the base covers these blocks.
func (v *Volume) ReplWriteBase(off int64, p []byte) error {
	if err := v.begin("base write", off, int64(len(p)), 0, true); err != nil {
		return err
	}
	defer v.ioMu.RUnlock()
	if v.latestSnap() != nil {
		// Keep the snapshots' blocks: a base write overwrites the extent
		// like the flusher does (the flusher must not interleave).
		v.flushMu.Lock()
		defer v.flushMu.Unlock()
	}
	if err := v.cowRange(off, int64(len(p)), false); err != nil {
		return fmt.Errorf("blockvol: base write off=%d len=%d: %w", off, len(p), ioError(err))
	}
	if err := v.writeData(p, off); err != nil {
		return fmt.Errorf("blockvol: base write off=%d len=%d: %w", off, len(p), ioError(err))
	}
	return nil
}

// ReplZeroBase makes [off, off+n) of the extent read as zeroes (hole).
func (v *Volume) ReplZeroBase(off, n int64) error {
	if err := v.begin("base zero", off, n, 0, true); err != nil {
		return err
	}
	defer v.ioMu.RUnlock()
	if v.latestSnap() != nil {
		v.flushMu.Lock()
		defer v.flushMu.Unlock()
	}
	if err := v.cowRange(off, n, true); err != nil {
		return fmt.Errorf("blockvol: base zero off=%d len=%d: %w", off, n, ioError(err))
	}
	if err := v.punchData(off, n); err != nil {
		return fmt.Errorf("blockvol: base zero off=%d len=%d: %w", off, n, ioError(err))
	}
	return nil
}

// ReplSyncBase makes base data written so far durable (extent fdatasync).
func (v *Volume) ReplSyncBase() error {
	v.ioMu.RLock()
	defer v.ioMu.RUnlock()
	if v.closed.Load() {
		return fmt.Errorf("blockvol: sync base: %w", blockdev.ErrClosed)
	}
	if err := v.syncData(); err != nil {
		return fmt.Errorf("blockvol: sync base: %w", ioError(err))
	}
	return nil
}

// ReplCheckpoint runs flusher cycles until the checkpoint and the tail
// stop moving (the retention floor still applies). Tests use it to make
// WAL recycling deterministic.
func (v *Volume) ReplCheckpoint() error {
	if err := v.syncWAL(v.comp.doneRelaxed()); err != nil {
		return err
	}
	for i := 0; i < 1<<20; i++ {
		progressed, err := v.flushCycle()
		if err != nil {
			return fmt.Errorf("blockvol: checkpoint: %w", err)
		}
		if !progressed {
			return nil
		}
	}
	return nil
}
