package blockvol

import (
	"fmt"
	"time"

	"github.com/blockd/blockd/wal"
)

// recover rebuilds the in-memory state from the superblock and the WAL:
// scan from the tail (the oldest retained record) past everything ever
// written until the first record that does not check out, replay records
// after the checkpoint into the dirty map, set the next LSN, then bump and
// persist the WAL generation, with the LSN it starts at, before anything
// new is appended. Records from that LSN on must carry that generation
// (ScanOptions.GenLSN): the log past the end found here may hold stale
// records of an earlier life at the very positions and LSNs this life
// reuses, and once a checkpoint puts the tail right on one, the rule that
// generations never decrease no longer sees the newer record before it.
func (v *Volume) recover() error {
	sb := &v.sb
	t0 := time.Now()
	v.index.reset(sb.TailLSN, sb.TailPos)
	replayed, skipped := 0, 0
	var redirs []recRedirect
	res, err := wal.Scan(v.walF, v.ring, wal.ScanOptions{
		From: sb.TailPos, FirstLSN: sb.TailLSN, MaxGen: sb.Gen, GenLSN: sb.GenLSN,
	}, func(pos uint64, rec wal.Record) error {
		// pos is where the record starts; a padding record before it
		// is part of its reservation but the index only needs a
		// position the walk can start from.
		v.index.add(rec.LSN, pos)
		if rec.LSN <= sb.CheckpointLSN {
			skipped++
			return nil
		}
		if err := v.checkRecord(rec); err != nil {
			return fmt.Errorf("%w: WAL record LSN %d at %d: %v", ErrCorrupt, rec.LSN, pos, err)
		}
		switch rec.Type {
		case wal.Write:
			v.dirty.putRange(uint64(rec.Offset)>>v.bshift, uint64(rec.Length)>>v.bshift, pos+wal.HeaderSize, uint64(v.bs))
		case wal.Zero:
			v.zeros.add(uint64(rec.Offset)>>v.bshift, uint64(rec.Offset+int64(rec.Length))>>v.bshift, pos)
		case wal.Snapshot, wal.SnapshotDelete:
			if err := v.recoverSnapshotRecord(pos, rec); err != nil {
				return fmt.Errorf("WAL record LSN %d (%s) at %d: %w", rec.LSN, rec.Type, pos, err)
			}
		case wal.Redirect:
			var err error
			if redirs, err = v.collectRedirect(redirs, pos, rec); err != nil {
				return fmt.Errorf("WAL record LSN %d (%s) at %d: %w", rec.LSN, rec.Type, pos, err)
			}
		}
		replayed++
		return nil
	})
	if err != nil {
		return fmt.Errorf("recovery scan: %w", err)
	}
	discarded, firstDiscarded, err := v.resolveRedirects(redirs)
	if err != nil {
		return fmt.Errorf("recovery: %w", err)
	}
	if res.LastLSN < sb.CheckpointLSN {
		return fmt.Errorf("%w: WAL ends at LSN %d at position %d, before the checkpoint LSN %d: %v",
			ErrCorrupt, res.LastLSN, res.End, sb.CheckpointLSN, res.Stop)
	}
	if res.LastLSN < sb.DurableLSN {
		return fmt.Errorf("%w: WAL ends at LSN %d at position %d, before LSN %d that was synced: %v",
			ErrCorrupt, res.LastLSN, res.End, sb.DurableLSN, res.Stop)
	}
	if v.trace != nil {
		v.trace("recovered %+v", res)
	}
	v.nextLSN = res.LastLSN + 1
	v.head = res.End
	v.headLSN.Store(res.LastLSN)
	v.durLSN.Store(res.LastLSN)
	v.gc.cond.L = &v.gc.mu
	v.gc.durLSN, v.gc.durEnd = res.LastLSN, res.End
	v.comp.init(res.LastLSN, res.End)
	v.ckptLSN.Store(sb.CheckpointLSN)
	v.ckptPos.Store(sb.CheckpointPos)
	v.tailLSN.Store(sb.TailLSN)
	v.tailPos.Store(sb.TailPos)
	reason := "clean"
	if res.Stop != nil {
		reason = res.Stop.Error()
	}
	torn := res.Stop != nil && !res.Unwritten
	if replayed > 0 || torn {
		v.log.Info("engine_recovery", "records_replayed", replayed, "records_retained", skipped,
			"checkpoint_lsn", sb.CheckpointLSN, "head_lsn", res.LastLSN, "end_pos", res.End,
			"dirty_blocks", v.dirty.len(), "zero_ranges", v.zeros.n.Load(),
			"redirects_pending", v.slots.npending.Load(), "redirects_discarded", discarded,
			"reason", reason, "gen", sb.Gen, "duration", time.Since(t0))
	}
	if torn {
		v.log.Info("engine_recovery_tail_discarded", "pos", res.End, "lsn", res.LastLSN+1, "reason", reason)
	}
	// Everything recovered counts as durable from now on: it is on disk
	// (it was read back), and the syncs below cover the page cache; the
	// redirected data first, as at every sync (redirect.go).
	if v.slots.npending.Load() > 0 {
		if err := v.syncData(); err != nil {
			return fmt.Errorf("sync redirected data after recovery: %w", err)
		}
	}
	if err := v.walF.Sync(); err != nil {
		return fmt.Errorf("sync WAL after recovery: %w", err)
	}
	v.superMu.Lock()
	defer v.superMu.Unlock()
	if sb.Gen == ^uint32(0) {
		return fmt.Errorf("%w: WAL generation exhausted", ErrCorrupt)
	}
	sb.Gen++
	sb.GenLSN = res.LastLSN + 1
	sb.DurableLSN = res.LastLSN
	if discarded > 0 {
		// A discarded redirect stays in the log: DurableLSN must not
		// cover it (see checkpointDiscarded).
		sb.DurableLSN = firstDiscarded - 1
		v.slots.trustCap.Store(firstDiscarded - 1)
	}
	v.gen = sb.Gen
	if err := v.persistSuperblock(); err != nil {
		return fmt.Errorf("persist WAL generation: %w", err)
	}
	v.slots.trustLSN.Store(sb.DurableLSN)
	return nil
}

// checkRecord validates a replayed record against the volume geometry.
func (v *Volume) checkRecord(rec wal.Record) error {
	switch rec.Type {
	case wal.Write, wal.Zero:
		bs := v.bs
		if err := checkExtent(v.recordLimit(), bs, rec.Offset, int64(rec.Length)); err != nil {
			return fmt.Errorf("%s [%d,+%d): %w", rec.Type, rec.Offset, rec.Length, err)
		}
	case wal.Barrier:
	case wal.Snapshot, wal.SnapshotDelete:
		return v.validateSnapshotRecord(rec)
	case wal.Redirect:
		_, err := v.checkRedirect(rec)
		return err
	default:
		return fmt.Errorf("unexpected record type %s", rec.Type)
	}
	return nil
}
