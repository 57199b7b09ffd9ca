package blockvol

// Snapshot transfer for a replica after a base transfer. A rebuild or a
// resync (ReplResetHead, ReplWriteBase) gives a replica the primary's
// data but none of the WAL history in which its snapshots were created,
// so the snapshots are copied separately:
//
//   - Source (the primary, existing methods only): list Snapshots(); for
//     each, newest first, OpenSnapshot it (this also keeps it from being
//     deleted meanwhile) and send its SnapshotInfo, and the bytes of
//     ChangedRanges(it, next newer) (nil ranges, the whole snapshot, for
//     the newest).
//   - Sink (the replica): InstallSnapshot for each, in the same order,
//     once its base transfer is complete and its live content is the one
//     the newest snapshot is compared against. The installed snapshot
//     stores only where it differs from the next newer one (or, for the
//     newest, from the live volume), so it costs what it costs natively.
//
// Not handled here: a snapshot record the replica applies while its base
// transfer is still running would capture an unfinished base. The
// replica's receiver (replication) applies such a record as a delete of
// an absent snapshot instead, and the snapshot is installed with the
// others once the base is complete. The replica's snapshots that the
// source does not have are dropped first (ReplDropSnapshots,
// snapshot_drop.go), so that the installed ones are older than every
// snapshot left.

import (
	"bytes"
	"cmp"
	"fmt"
	"slices"

	"github.com/blockd/blockd/blockdev"
)

// InstallSnapshot adds the snapshot info copied from another volume.
// Snapshots are installed newest first: info.LSN must be below every
// snapshot this volume has and at most HeadLSN, and info.SizeBytes at
// most the size of the next newer one (or of the volume). read reads the
// snapshot's bytes at an offset; ranges are where it may differ from the
// next newer snapshot here (the source's ChangedRanges(info.Name, newer));
// with no snapshot here, ranges must be nil and the whole snapshot is
// compared with the live volume. It writes no WAL record; it is durable
// when it returns. Errors: ErrSnapshotExists, ErrSnapshotName,
// blockdev.ErrInvalid for a wrong order or size, and read's errors
// (nothing is installed then).
func (v *Volume) InstallSnapshot(info SnapshotInfo, ranges []Range, read func(p []byte, off int64) error) error {
	if err := v.installSnapshot(info, ranges, read); err != nil {
		return fmt.Errorf("blockvol: install snapshot %q: %w", info.Name, err)
	}
	return nil
}

func (v *Volume) installSnapshot(info SnapshotInfo, ranges []Range, read func(p []byte, off int64) error) error {
	if err := CheckSnapshotName(info.Name); err != nil {
		return err
	}
	if err := checkUUID(info.UUID); err != nil {
		return fmt.Errorf("%v: %w", err, blockdev.ErrInvalid)
	}
	v.snaps.opMu.Lock()
	defer v.snaps.opMu.Unlock()
	v.ioMu.Lock()
	defer v.ioMu.Unlock()
	if err := v.snapOpCheck(); err != nil {
		return err
	}
	list := v.snapList()
	if findSnap(list, info.Name) >= 0 || findSnapID(list, info.ID) >= 0 {
		return fmt.Errorf("id %d: %w", info.ID, ErrSnapshotExists)
	}
	limit := v.size.Load()
	var next *snapshot
	if len(list) > 0 {
		next = list[0]
		limit = next.info.SizeBytes
	}
	switch {
	case info.ID == 0:
		return fmt.Errorf("snapshot ID 0: %w", blockdev.ErrInvalid)
	case info.SizeBytes <= 0 || info.SizeBytes%v.bs != 0 || info.SizeBytes > limit:
		return fmt.Errorf("size %d: not a positive multiple of %d up to %d: %w", info.SizeBytes, v.bs, limit, blockdev.ErrInvalid)
	case info.LSN > v.headLSN.Load():
		return fmt.Errorf("LSN %d beyond the head %d: %w", info.LSN, v.headLSN.Load(), blockdev.ErrInvalid)
	case next != nil && info.LSN >= next.info.LSN:
		return fmt.Errorf("LSN %d not below the oldest snapshot here (%q at %d): install newest first: %w",
			info.LSN, next.info.Name, next.info.LSN, blockdev.ErrInvalid)
	case next == nil && ranges != nil:
		return fmt.Errorf("ranges given with no newer snapshot to compare with: %w", blockdev.ErrInvalid)
	}
	if ranges == nil {
		ranges = []Range{{0, info.SizeBytes}}
	}
	if err := v.flushAllLocked(); err != nil {
		return err
	}
	info.HeldBytes = 0
	s, err := v.createSnapFile(info)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		_ = v.removeSnapFile(s)
		return err
	}
	n, err := v.installDiff(s, next, info.SizeBytes, ranges, read)
	if err != nil {
		return fail(err)
	}
	nl := append([]*snapshot{s}, list...)
	nextID := max(v.snaps.nextID, info.ID+1)
	if err := v.stageSnapMeta(nl, nextID, nil); err != nil {
		return fail(err)
	}
	if err := v.commitSnapMeta(); err != nil {
		v.unstageSnapMeta()
		return fail(err)
	}
	v.snaps.mu.Lock()
	v.snaps.list, v.snaps.nextID = nl, nextID
	v.snaps.mu.Unlock()
	v.log.Info("engine_snapshot_installed", "snapshot", info.Name, "id", info.ID, "uuid", info.UUID,
		"lsn", info.LSN, "blocks_held", n, "snapshots", len(nl))
	return nil
}

// installDiff stores in s the blocks of ranges whose content (from read)
// differs from next's (or the extent's, with no next). The caller holds
// ioMu exclusively with the WAL flushed, so the extent is the live volume.
func (v *Volume) installDiff(s, next *snapshot, size int64, ranges []Range, read func(p []byte, off int64) error) (int, error) {
	ranges = slices.Clone(ranges)
	slices.SortFunc(ranges, func(a, b Range) int { return cmp.Compare(a.Off, b.Off) })
	const chunk = 256
	bs := v.bs
	src := make([]byte, chunk*bs)
	own := make([]byte, chunk*bs)
	total := 0
	for _, r := range ranges {
		if r.Off < 0 || r.Len <= 0 || r.Off%bs != 0 || r.Len%bs != 0 || r.Off > size || r.Len > size-r.Off {
			return 0, fmt.Errorf("range [%d,+%d) not whole blocks inside %d bytes: %w", r.Off, r.Len, size, blockdev.ErrInvalid)
		}
		for off := r.Off; off < r.Off+r.Len; off += chunk * bs {
			n := min(r.Off+r.Len-off, chunk*bs)
			if err := read(src[:n], off); err != nil {
				return 0, fmt.Errorf("read source at %d: %w", off, err)
			}
			var err error
			if next != nil {
				err = v.readSnap(next, own[:n], off)
			} else {
				err = v.readExtent(own[:n], off)
			}
			if err != nil {
				return 0, err
			}
			var ents []snapEnt
			for k := int64(0); k < n; k += bs {
				if !bytes.Equal(src[k:k+bs], own[k:k+bs]) {
					ents = append(ents, snapEnt{block: uint64(off+k) >> v.bshift, data: src[k : k+bs]})
				}
			}
			if err := v.appendSnapEntries(s, ents); err != nil {
				return 0, err
			}
			total += len(ents)
		}
	}
	return total, nil
}
