package blockvol

// Dropping snapshots on a replica without a WAL record. After a resync or
// a rebuild, replication makes a replica hold exactly its primary's
// snapshots: the replica's own that the primary does not have (deleted on
// the primary while the replica was away, or left from before a rebuild)
// are dropped here, locally, since no record of the primary's log says
// so. Everything else works as for DeleteSnapshot: what a kept snapshot
// reads through a dropped one is copied into it first, the new list is
// committed in one metadata replace (the drop is atomic: after a power cut
// either every dropped snapshot is still there or none is), and the files
// are removed, so their space is given back.

import (
	"fmt"
	"slices"
)

// ReplDropSnapshots drops every snapshot for which keep returns false,
// with no WAL record, and returns the ones dropped (oldest first). keep
// is called before any of the engine's locks is taken, on the list as it
// is then; a snapshot that appears after that is kept. It blocks I/O
// while it runs. Readers of a dropped snapshot fail with
// ErrSnapshotNotFound from then on. A record of a dropped snapshot found
// in the WAL by a later recovery does not bring it back, and a later
// SnapshotDelete record of it is applied as for an absent snapshot.
func (v *Volume) ReplDropSnapshots(keep func(SnapshotInfo) bool) ([]SnapshotInfo, error) {
	dropped, err := v.replDropSnapshots(keep)
	if err != nil {
		return nil, fmt.Errorf("blockvol: drop snapshots: %w", err)
	}
	return dropped, nil
}

func (v *Volume) replDropSnapshots(keep func(SnapshotInfo) bool) ([]SnapshotInfo, error) {
	gone := map[uint64]bool{}
	for _, in := range v.Snapshots() {
		if !keep(in) {
			gone[in.ID] = true
		}
	}
	if len(gone) == 0 {
		return nil, nil
	}
	v.snaps.opMu.Lock()
	defer v.snaps.opMu.Unlock()
	v.ioMu.Lock()
	defer v.ioMu.Unlock()
	if err := v.snapOpCheck(); err != nil {
		return nil, err
	}
	list := v.snapList()
	var kept, drop []*snapshot
	for _, s := range list {
		if gone[s.info.ID] {
			drop = append(drop, s)
		} else {
			kept = append(kept, s)
		}
	}
	if len(drop) == 0 {
		return nil, nil
	}
	// The flusher is paused throughout: it preserves overwritten blocks
	// in the newest snapshot, which may be one being dropped.
	v.flushMu.Lock()
	defer v.flushMu.Unlock()
	// A kept snapshot reads a block it lacks through the newer snapshots
	// up to the next kept one: the dropped ones among them are merged
	// into it, nearest first (a block it already holds is skipped, so the
	// nearest holder wins, as in a read).
	merged := 0
	var into *snapshot
	for _, s := range list {
		if slices.Contains(kept, s) {
			into = s
			continue
		}
		if into == nil {
			continue // older than every kept snapshot: nothing reads through it
		}
		n, err := v.mergeInto(s, into)
		if err != nil {
			return nil, err
		}
		merged += n
	}
	ids := make([]uint64, 0, len(drop))
	var freed int64
	for _, s := range drop {
		ids = append(ids, s.info.ID)
		freed += s.heldBytes()
	}
	v.snaps.mu.RLock()
	nextID := v.snaps.nextID
	v.snaps.mu.RUnlock()
	if err := v.stageSnapMeta(kept, nextID, ids); err != nil {
		return nil, err
	}
	// The commit point: the metadata without the dropped snapshots. A
	// power cut after it leaves their files to Open, which removes them
	// (the metadata lists them as deleted).
	if err := v.commitSnapMeta(); err != nil {
		v.fail(err)
		return nil, ioError(err)
	}
	v.snaps.mu.Lock()
	v.snaps.list = kept
	var rmErr error
	for _, s := range drop {
		s.gone.Store(true)
		if err := v.removeSnapFile(s); err != nil && rmErr == nil {
			rmErr = err
		}
	}
	v.snaps.mu.Unlock()
	out := make([]SnapshotInfo, 0, len(drop))
	for _, s := range drop {
		in := s.info
		out = append(out, in)
		v.log.Info("engine_snapshot_dropped", "snapshot", in.Name, "id", in.ID, "uuid", in.UUID, "lsn", in.LSN)
	}
	v.log.Info("engine_snapshots_dropped", "dropped", len(drop), "kept", len(kept), "merged_blocks", merged, "freed_bytes", freed)
	if rmErr != nil {
		// Committed (the snapshots are gone); a file left is removed on
		// the next Open.
		return nil, rmErr
	}
	return out, nil
}

// mergeInto copies the blocks s holds that dst lacks (inside dst's size)
// into dst. Delete merges into the next older snapshot (mergeIntoOlder),
// a replica's drop into the next kept one (its caller holds flushMu).
// Idempotent; it only adds to dst.
func (v *Volume) mergeInto(s, dst *snapshot) (int, error) {
	limit := uint64(dst.info.SizeBytes) >> v.bshift
	type src struct {
		block uint64
		off   int64
	}
	var todo []src
	s.mu.RLock()
	for b, off := range s.idx {
		if b < limit && !dst.has(b) {
			todo = append(todo, src{b, off})
		}
	}
	s.mu.RUnlock()
	slices.SortFunc(todo, func(a, b src) int { return cmpU64(a.block, b.block) })
	const chunk = 256
	buf := make([]byte, chunk*v.bs)
	for k := 0; k < len(todo); k += chunk {
		part := todo[k:min(k+chunk, len(todo))]
		ents := make([]snapEnt, len(part))
		for j, t := range part {
			ents[j].block = t.block
			if t.off != snapZeroEnt {
				d := buf[int64(j)*v.bs : int64(j+1)*v.bs]
				if err := v.readSnapBlock(s, t.off, d); err != nil {
					return 0, err
				}
				ents[j].data = d
			}
		}
		if err := v.appendSnapEntries(dst, ents); err != nil {
			return 0, err
		}
	}
	return len(todo), nil
}
