package blockvol

import (
	"fmt"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

// HeadLSN is the last LSN assigned.
func (v *Volume) HeadLSN() uint64 { return v.headLSN.Load() }

// DurableLSN is the highest LSN covered by a local WAL fdatasync.
func (v *Volume) DurableLSN() uint64 { return v.durLSN.Load() }

// CheckpointLSN: every record <= it is in the extent, which is synced.
func (v *Volume) CheckpointLSN() uint64 { return v.ckptLSN.Load() }

// OldestRetainedLSN is the first LSN still readable from the WAL
// (HeadLSN()+1 when the WAL holds none).
func (v *Volume) OldestRetainedLSN() uint64 { return v.tailLSN.Load() }

// ReadRecords calls fn for each retained record with LSN >= fromLSN, in
// order, up to the last completed record. rec.Payload is only valid during
// the call. It fails with an error wrapping ErrNotRetained when fromLSN is
// older than OldestRetainedLSN (or becomes so while reading).
//
// It does not hold the I/O lock while fn runs (fn may stream to a slow
// replica): a Close meanwhile makes it fail with a read error.
func (v *Volume) ReadRecords(fromLSN uint64, fn func(wal.Record) error) error {
	if v.closed.Load() {
		return fmt.Errorf("blockvol: read records: %w", blockdev.ErrClosed)
	}
	if fromLSN == 0 {
		fromLSN = 1
	}
	tail := v.tailLSN.Load()
	if fromLSN < tail {
		return fmt.Errorf("blockvol: read records from LSN %d: oldest retained is %d: %w", fromLSN, tail, ErrNotRetained)
	}
	done, doneEnd := v.comp.get()
	if fromLSN > done {
		return nil
	}
	pos, err := v.posOf(fromLSN)
	if err != nil {
		if v.tailLSN.Load() > fromLSN {
			return fmt.Errorf("blockvol: read records from LSN %d: %w", fromLSN, ErrNotRetained)
		}
		return fmt.Errorf("blockvol: read records: %w", err)
	}
	next := fromLSN
	var rbuf []byte
	res, err := wal.Scan(v.walF, v.ring, wal.ScanOptions{
		From: pos, FirstLSN: fromLSN, MaxLSN: done, Limit: doneEnd - pos,
	}, func(_ uint64, rec wal.Record) error {
		if rec.Type == wal.Redirect {
			// A large write whose data went to the data files: replicas
			// get the Write it stands for.
			w, err := v.redirectAsWrite(rec, rbuf)
			if err != nil {
				return err
			}
			rec, rbuf = w, w.Payload
		}
		if err := fn(rec); err != nil {
			return err
		}
		next = rec.LSN + 1
		return nil
	})
	if err != nil {
		return fmt.Errorf("blockvol: read records: %w", err)
	}
	if res.LastLSN < done {
		if t := v.tailLSN.Load(); t > next {
			return fmt.Errorf("blockvol: read records: LSN %d recycled while reading (oldest retained %d): %w", next, t, ErrNotRetained)
		}
		return fmt.Errorf("blockvol: read records: %w: stopped at LSN %d of %d: %v", ErrCorrupt, res.LastLSN, done, res.Stop)
	}
	return nil
}

// checkExtent validates [off, off+length) against a volume of size bytes
// and block size bs without overflow: off+length is never computed, so
// an offset near 2^63 cannot wrap below the size. The error names the
// rule that failed.
func checkExtent(size, bs, off, length int64) error {
	switch {
	case length <= 0:
		return fmt.Errorf("length %d not positive", length)
	case off < 0:
		return fmt.Errorf("negative offset %d", off)
	case off%bs != 0 || length%bs != 0:
		return fmt.Errorf("offset %d or length %d not a multiple of the %d-byte block", off, length, bs)
	case off > size || length > size-off:
		return fmt.Errorf("beyond the end of a %d-byte volume", size)
	}
	return nil
}

// ValidateRecord checks a record received from a primary before anything
// of it is stored: a known type, a block-aligned extent inside the
// volume (overflow-safe), a write no larger than one request
// (blockdev.MaxIOSize, plus one block for an unaligned request) and
// carrying exactly its length in data, no data on a dataless record.
// The error wraps blockdev.ErrInvalid. ApplyRecord runs it too; a
// receiver calls it first so that a bad record is refused before any
// side effect.
func (v *Volume) ValidateRecord(rec wal.Record) error {
	if err := v.validateRecord(rec); err != nil {
		return fmt.Errorf("blockvol: record LSN %d: %v: %w", rec.LSN, err, blockdev.ErrInvalid)
	}
	return nil
}

func (v *Volume) validateRecord(rec wal.Record) error {
	switch rec.Type {
	case wal.Write:
		if limit := blockdev.MaxIOSize + v.bs; int64(rec.Length) > limit {
			return fmt.Errorf("write of %d bytes larger than %d", rec.Length, limit)
		}
		if uint64(len(rec.Payload)) != uint64(rec.Length) {
			return fmt.Errorf("write payload %d bytes, length %d", len(rec.Payload), rec.Length)
		}
	case wal.Zero:
		if len(rec.Payload) != 0 {
			return fmt.Errorf("zero record with %d data bytes", len(rec.Payload))
		}
	case wal.Barrier:
		if len(rec.Payload) != 0 || rec.Length != 0 || rec.Offset != 0 {
			return fmt.Errorf("barrier record with an extent or data")
		}
		return nil
	case wal.Snapshot, wal.SnapshotDelete:
		return v.validateSnapshotRecord(rec)
	case wal.Redirect:
		return fmt.Errorf("redirect record: its data is in the primary's files, a replica takes the write itself")
	default:
		return fmt.Errorf("unexpected record type %s", rec.Type)
	}
	if err := checkExtent(v.recordLimit(), v.bs, rec.Offset, int64(rec.Length)); err != nil {
		return fmt.Errorf("%s [%d,+%d): %w", rec.Type, rec.Offset, rec.Length, err)
	}
	return nil
}

// ApplyRecord appends a record received from the primary, keeping its LSN
// and epoch. rec.LSN must be HeadLSN()+1. A record that fails
// ValidateRecord is refused before it reaches the WAL and leaves the
// volume as it was (it does not fail the volume).
func (v *Volume) ApplyRecord(rec wal.Record) error {
	if rec.Type == wal.Snapshot || rec.Type == wal.SnapshotDelete {
		return v.applySnapshotRecord(rec)
	}
	v.ioMu.RLock()
	defer v.ioMu.RUnlock()
	if v.closed.Load() {
		return fmt.Errorf("blockvol: apply record: %w", blockdev.ErrClosed)
	}
	if err := v.failErr(); err != nil {
		return fmt.Errorf("blockvol: apply record: %w", err)
	}
	if err := v.validateRecord(rec); err != nil {
		return fmt.Errorf("blockvol: apply record LSN %d: %v: %w", rec.LSN, err, blockdev.ErrInvalid)
	}
	if err := v.settleAll(); err != nil {
		return fmt.Errorf("blockvol: apply record: %w", err)
	}
	var first, nb uint64
	if rec.Type != wal.Barrier {
		first, nb = uint64(rec.Offset)>>v.bshift, uint64(rec.Length)>>v.bshift
		v.lockStripes(first, nb)
		defer v.unlockStripes(first, nb)
	}
	if _, err := v.appendRecord(rec, true); err != nil {
		return fmt.Errorf("blockvol: apply record: %w", err)
	}
	return nil
}

// ApplyRecords applies records received from the primary, in order, as
// ApplyRecord would one after the other, but in as few WAL writes as
// their log positions allow: records of one batch go to the WAL in one
// pwrite and the dirty map and completion are updated once the write is
// done. recs[0].LSN must be HeadLSN()+1 and the LSNs consecutive.
// Snapshot records are applied one at a time at their place in the
// sequence (they take the volume's exclusive lock).
//
// It returns how many records were applied: recs[:n] each whole, none of
// recs[n:]. A record that fails ValidateRecord (or breaks the LSN
// sequence) is refused with an error wrapping blockdev.ErrInvalid and
// nothing after it is applied; the records before it are. A failed WAL
// write fails the volume; n then counts the records written before it
// (not readable, but a crash may keep them, as it may any record not yet
// synced). Like
// ApplyRecord it does not make anything durable: Flush does, and
// DurableLSN moves only then.
func (v *Volume) ApplyRecords(recs []wal.Record) (int, error) {
	done := 0
	for done < len(recs) {
		if t := recs[done].Type; t == wal.Snapshot || t == wal.SnapshotDelete {
			if err := v.applySnapshotRecord(recs[done]); err != nil {
				return done, err
			}
			done++
			continue
		}
		end := done + 1
		for end < len(recs) && recs[end].Type != wal.Snapshot && recs[end].Type != wal.SnapshotDelete {
			end++
		}
		n, err := v.applyRun(recs[done:end])
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// applyRun applies a run of records without snapshot records: each is
// validated before any of them is stored, and the valid prefix is
// appended in batches under the stripes of every block it touches.
func (v *Volume) applyRun(recs []wal.Record) (int, error) {
	v.ioMu.RLock()
	defer v.ioMu.RUnlock()
	if v.closed.Load() {
		return 0, fmt.Errorf("blockvol: apply records: %w", blockdev.ErrClosed)
	}
	if err := v.failErr(); err != nil {
		return 0, fmt.Errorf("blockvol: apply records: %w", err)
	}
	// A redirect a client write made while the role changed may still
	// be unsettled: the records applied next may go into its chunks
	// (redirect.go). Two atomic loads when there is none.
	if err := v.settleAll(); err != nil {
		return 0, fmt.Errorf("blockvol: apply records: %w", err)
	}
	valid := len(recs)
	var bad error
	next := v.headLSN.Load() + 1
	for i := range recs {
		rec := &recs[i]
		if rec.LSN != next+uint64(i) {
			valid, bad = i, fmt.Errorf("blockvol: apply record LSN %d, expected %d: %w", rec.LSN, next+uint64(i), blockdev.ErrInvalid)
			break
		}
		if err := v.validateRecord(*rec); err != nil {
			valid, bad = i, fmt.Errorf("blockvol: apply record LSN %d: %v: %w", rec.LSN, err, blockdev.ErrInvalid)
			break
		}
		if rec.Type == wal.Write && rec.Length > pooledMax {
			// A large write: on its own (two pwrites, no staging copy).
			valid = i
			break
		}
	}
	done := 0
	if valid == 0 && bad == nil {
		// recs[0] is a large write.
		if err := v.applyOneLocked(recs[0]); err != nil {
			return 0, err
		}
		return 1, nil
	}
	var set stripeSet
	for _, rec := range recs[:valid] {
		if rec.Type != wal.Barrier {
			set.add(uint64(rec.Offset)>>v.bshift, uint64(rec.Length)>>v.bshift)
		}
	}
	v.lockStripeSet(&set)
	defer v.unlockStripeSet(&set)
	res := make([]batchRes, valid)
	for done < valid {
		n, err := v.appendBatch(recs[done:valid], res[done:valid])
		done += n
		if err != nil {
			return done, fmt.Errorf("blockvol: apply records: %w", err)
		}
	}
	return done, bad
}

// applyOneLocked appends one validated non-snapshot record under its
// stripes; the caller holds ioMu (shared).
func (v *Volume) applyOneLocked(rec wal.Record) error {
	var first, nb uint64
	if rec.Type != wal.Barrier {
		first, nb = uint64(rec.Offset)>>v.bshift, uint64(rec.Length)>>v.bshift
		v.lockStripes(first, nb)
		defer v.unlockStripes(first, nb)
	}
	if _, err := v.appendRecord(rec, true); err != nil {
		return fmt.Errorf("blockvol: apply record: %w", err)
	}
	return nil
}

// Epoch is the persisted epoch.
func (v *Volume) Epoch() uint64 { return v.epoch.Load() }

// Role is the persisted role ("none" for a new volume).
func (v *Volume) Role() string { return *v.role.Load() }

// SetEpochRole persists epoch and role with fsync before returning. The
// epoch never decreases.
func (v *Volume) SetEpochRole(epoch uint64, role string) error {
	if len(role) > maxRoleLen {
		return fmt.Errorf("blockvol: set role %q: longer than %d bytes: %w", role, maxRoleLen, blockdev.ErrInvalid)
	}
	v.ioMu.RLock()
	defer v.ioMu.RUnlock()
	if v.closed.Load() {
		return fmt.Errorf("blockvol: set epoch: %w", blockdev.ErrClosed)
	}
	if role != "primary" {
		// A replica holds no unsettled redirect (redirect.go): the
		// records it applies next go into the same chunks.
		if err := v.settleAll(); err != nil {
			return fmt.Errorf("blockvol: set role %s: settle redirected writes: %w", role, err)
		}
	}
	v.superMu.Lock()
	defer v.superMu.Unlock()
	if epoch < v.sb.Epoch {
		return fmt.Errorf("blockvol: set epoch %d: below current epoch %d: %w", epoch, v.sb.Epoch, blockdev.ErrInvalid)
	}
	old := v.sb
	v.sb.Epoch, v.sb.Role = epoch, role
	if err := v.persistSuperblock(); err != nil {
		v.sb.Epoch, v.sb.Role = old.Epoch, old.Role
		return fmt.Errorf("blockvol: set epoch %d role %s: %w", epoch, role, ioError(err))
	}
	// Records appended from now on carry the new epoch.
	v.appendMu.Lock()
	v.epoch.Store(epoch)
	v.appendMu.Unlock()
	r := role
	v.role.Store(&r)
	v.log.Info("engine_epoch_role", "epoch", epoch, "role", role)
	return nil
}

// Barrier appends a Barrier record (no data) and returns its LSN.
func (v *Volume) Barrier() (uint64, error) {
	v.ioMu.RLock()
	defer v.ioMu.RUnlock()
	if v.closed.Load() {
		return 0, fmt.Errorf("blockvol: barrier: %w", blockdev.ErrClosed)
	}
	return v.appendRecord(wal.Record{Type: wal.Barrier}, false)
}

// FS is the file system the volume's files live on (Options.FS): the one
// replication keeps its per-volume state files on too.
func (v *Volume) FS() vfs.FS { return v.fs }

// WaitApplied waits until every record with LSN <= lsn is written and
// readable (reads see it), or the volume has failed.
func (v *Volume) WaitApplied(lsn uint64) error {
	c := &v.comp
	c.mu.Lock()
	for c.done < lsn && v.failed.Load() == nil && !v.closed.Load() {
		c.cond.Wait()
	}
	c.mu.Unlock()
	if err := v.failErr(); err != nil {
		return err
	}
	if v.closed.Load() && c.doneRelaxed() < lsn {
		return fmt.Errorf("blockvol: wait for LSN %d: %w", lsn, blockdev.ErrClosed)
	}
	return nil
}
