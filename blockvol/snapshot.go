package blockvol

// Snapshots: the engine behind the seam in snapshot_api.go.
//
// A snapshot is a point in the LSN sequence: the record of type
// wal.Snapshot at LSN L; the snapshot holds the effect of every record
// before L. Creating one (CreateSnapshot on a primary, ApplyRecord of the
// record on a replica) blocks I/O, flushes the WAL into the extent up to
// L-1, stages the snapshot's file and the new metadata (the steps that
// need space), appends and syncs the record (the commit point), and then
// renames the metadata into place, all with the flusher paused so that
// the checkpoint cannot pass the record before the metadata names the
// snapshot. Recovery activates a snapshot record it finds after the
// checkpoint that the metadata does not list.
//
// Copy-on-write at flush time: every snapshot has a file (snapshot_store.go)
// holding the pre-images of the blocks the flusher overwrote in the
// extent after the snapshot was taken. Before a flush cycle overwrites or
// punches a block of the extent, the newest snapshot that does not hold
// the block yet gets its current extent content, synced before the
// extent is touched. Only the newest needs it: an older snapshot that
// lacks a block reads it through the newer ones. Reading snapshot S_k:
// S_k's file, else S_{k+1}'s, ..., else the extent (checked again after
// the extent read, which makes it safe against a concurrent flusher).
// Live reads never look at snapshots, so they do not slow down as
// snapshots accumulate.
//
// Deleting S_k copies the blocks it holds that S_{k-1} lacks into
// S_{k-1} (idempotent), then appends a wal.SnapshotDelete record, commits
// the metadata without S_k and removes its file. Restore (snapshot_rw.go)
// writes S_k's content back as ordinary WAL records.

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

// snapSet is the volume's snapshots.
type snapSet struct {
	// opMu serialises snapshot operations (create, delete, restore,
	// rewrite, and their records on a replica). Taken before ioMu.
	opMu sync.Mutex

	// mu guards list (replaced, never modified in place), nextID and the
	// snapshots' refs and deleting. Snapshot reads hold it shared for
	// their whole duration, so a file is never closed under them.
	mu     sync.RWMutex
	list   []*snapshot // by LSN, oldest first
	nextID uint64
}

func (v *Volume) snapList() []*snapshot {
	v.snaps.mu.RLock()
	defer v.snaps.mu.RUnlock()
	return v.snaps.list
}

func (v *Volume) latestSnap() *snapshot {
	v.snaps.mu.RLock()
	defer v.snaps.mu.RUnlock()
	if n := len(v.snaps.list); n > 0 {
		return v.snaps.list[n-1]
	}
	return nil
}

func findSnap(list []*snapshot, name string) int {
	for i, s := range list {
		if s.info.Name == name {
			return i
		}
	}
	return -1
}

func findSnapID(list []*snapshot, id uint64) int {
	for i, s := range list {
		if s.info.ID == id {
			return i
		}
	}
	return -1
}

// loadSnapshots opens the snapshots the metadata lists (before recovery,
// which may add and delete some).
func (v *Volume) loadSnapshots() error {
	m, err := v.loadSnapMeta()
	if err != nil {
		return err
	}
	for _, id := range m.Deleted {
		_ = v.fs.Remove(filepath.Join(v.dir, SnapshotFile(id)))
	}
	var list []*snapshot
	for _, in := range m.Snapshots {
		s, err := v.openSnapFile(in)
		if err != nil {
			for _, o := range list {
				o.f.Close()
			}
			return err
		}
		list = append(list, s)
	}
	slices.SortFunc(list, func(a, b *snapshot) int { return cmpU64(a.info.LSN, b.info.LSN) })
	v.snaps.list, v.snaps.nextID = list, m.NextID
	return nil
}

// finishSnapshotOpen runs after recovery: a snapshot file left by a
// create that did not commit is removed.
func (v *Volume) finishSnapshotOpen() {
	if findSnapID(v.snaps.list, v.snaps.nextID) < 0 {
		_ = v.fs.Remove(filepath.Join(v.dir, SnapshotFile(v.snaps.nextID)))
	}
}

func (v *Volume) closeSnapshots() error {
	v.snaps.mu.Lock()
	defer v.snaps.mu.Unlock()
	var errs []error
	for _, s := range v.snaps.list {
		if s.f != nil {
			errs = append(errs, s.f.Close())
		}
	}
	return errors.Join(errs...)
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Snapshots lists the snapshots, oldest first (by LSN).
func (v *Volume) Snapshots() []SnapshotInfo {
	list := v.snapList()
	out := make([]SnapshotInfo, 0, len(list))
	for _, s := range list {
		out = append(out, s.infoNow())
	}
	return out
}

// SnapshotInfo describes the snapshot name (ErrSnapshotNotFound if none).
func (v *Volume) SnapshotInfo(name string) (SnapshotInfo, error) {
	list := v.snapList()
	i := findSnap(list, name)
	if i < 0 {
		return SnapshotInfo{}, fmt.Errorf("blockvol: snapshot %q: %w", name, ErrSnapshotNotFound)
	}
	return list[i].infoNow(), nil
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// checkUUID accepts the canonical 8-4-4-4-12 hex form.
func checkUUID(u string) error {
	if len(u) != 36 {
		return fmt.Errorf("UUID %q: %d characters, want 36", u, len(u))
	}
	for i, c := range u {
		dash := i == 8 || i == 13 || i == 18 || i == 23
		hexDigit := c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
		if dash != (c == '-') || !dash && !hexDigit {
			return fmt.Errorf("UUID %q: not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", u)
		}
	}
	return nil
}

// CreateSnapshot takes a snapshot named name: every write acknowledged
// before the call is in it. It returns once the snapshot is durable
// locally (record synced, metadata committed). Errors: ErrSnapshotName,
// ErrSnapshotExists, blockdev.ErrInvalid for a malformed UUID, and I/O
// errors (a full disk before the commit point leaves nothing behind).
func (v *Volume) CreateSnapshot(name string, o SnapshotOptions) (SnapshotInfo, error) {
	if err := CheckSnapshotName(name); err != nil {
		return SnapshotInfo{}, fmt.Errorf("blockvol: create snapshot: %w", err)
	}
	uuid := o.UUID
	if uuid == "" {
		uuid = newUUID()
	} else if err := checkUUID(uuid); err != nil {
		return SnapshotInfo{}, fmt.Errorf("blockvol: create snapshot %q: %v: %w", name, err, blockdev.ErrInvalid)
	}
	v.snaps.opMu.Lock()
	defer v.snaps.opMu.Unlock()
	v.ioMu.Lock()
	defer v.ioMu.Unlock()
	if err := v.snapOpCheck(); err != nil {
		return SnapshotInfo{}, fmt.Errorf("blockvol: create snapshot %q: %w", name, err)
	}
	if findSnap(v.snapList(), name) >= 0 {
		return SnapshotInfo{}, fmt.Errorf("blockvol: create snapshot %q: %w", name, ErrSnapshotExists)
	}
	info := SnapshotInfo{
		ID: v.snaps.nextID, UUID: uuid, Name: name,
		Created: time.Unix(0, time.Now().UnixNano()).UTC(), SizeBytes: v.size.Load(),
	}
	payload, err := snapPayload(info).Encode()
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("blockvol: create snapshot %q: %w", name, err)
	}
	rec := wal.Record{Type: wal.Snapshot, Length: uint32(len(payload)), Payload: payload}
	info, err = v.snapshotCreateLocked(info, rec, false, "primary")
	if err != nil {
		return SnapshotInfo{}, fmt.Errorf("blockvol: create snapshot %q: %w", name, err)
	}
	return info, nil
}

func (v *Volume) snapOpCheck() error {
	if v.closed.Load() {
		return blockdev.ErrClosed
	}
	return v.failErr()
}

func snapPayload(in SnapshotInfo) wal.SnapshotPayload {
	return wal.SnapshotPayload{ID: in.ID, CreatedNano: in.Created.UnixNano(), Size: in.SizeBytes, Name: in.Name, UUID: in.UUID}
}

func payloadInfo(p wal.SnapshotPayload, lsn uint64) SnapshotInfo {
	return SnapshotInfo{ID: p.ID, UUID: p.UUID, Name: p.Name, LSN: lsn, Created: time.Unix(0, p.CreatedNano).UTC(), SizeBytes: p.Size}
}

// flushAllLocked checkpoints every complete record into the extent (the
// caller holds ioMu exclusively, so nothing new arrives): afterwards the
// dirty map and zero set are empty and the extent is the volume's content.
func (v *Volume) flushAllLocked() error {
	flushed := func() bool {
		return v.ckptLSN.Load() >= v.comp.doneRelaxed() && v.dirty.len() == 0 && v.zeros.n.Load() == 0 && v.slots.npending.Load() == 0
	}
	for i := 0; !flushed(); i++ {
		progressed, err := v.flushCycle()
		if err != nil {
			return fmt.Errorf("flush to the extent: %w", ioError(err))
		}
		// The background flusher may have done the work meanwhile.
		if !progressed && i > 0 && !flushed() {
			return fmt.Errorf("flush to the extent: no progress at checkpoint LSN %d of %d (%d dirty blocks, %d zero ranges): %w",
				v.ckptLSN.Load(), v.comp.doneRelaxed(), v.dirty.len(), v.zeros.n.Load(), blockdev.ErrIO)
		}
	}
	return nil
}

// snapshotCreateLocked creates the snapshot info with record rec (its LSN
// fixed on a replica). The caller holds opMu and ioMu exclusively.
func (v *Volume) snapshotCreateLocked(info SnapshotInfo, rec wal.Record, fixed bool, origin string) (SnapshotInfo, error) {
	if err := v.flushAllLocked(); err != nil {
		return SnapshotInfo{}, err
	}
	// The record is appended with the flusher stopped, which alone frees
	// log space: wait for room first (a retention hold may keep the log
	// full until replication moves it, and only the flusher then moves
	// the tail).
	if err := v.waitLogSpace(rec.Size()); err != nil {
		return SnapshotInfo{}, err
	}
	v.flushMu.Lock()
	defer v.flushMu.Unlock()
	lsn := v.headLSN.Load() + 1
	if fixed && rec.LSN != lsn {
		return SnapshotInfo{}, fmt.Errorf("snapshot record LSN %d, expected %d: %w", rec.LSN, lsn, blockdev.ErrInvalid)
	}
	info.LSN = lsn
	s, err := v.createSnapFile(info)
	if err != nil {
		return SnapshotInfo{}, err
	}
	list := append(slices.Clip(v.snapList()), s)
	nextID := max(v.snaps.nextID, info.ID+1)
	if err := v.stageSnapMeta(list, nextID, nil); err != nil {
		_ = v.removeSnapFile(s)
		return SnapshotInfo{}, err
	}
	got, err := v.appendRecord(rec, fixed)
	if err != nil {
		v.unstageSnapMeta()
		_ = v.removeSnapFile(s)
		return SnapshotInfo{}, err
	}
	if got != lsn {
		err := fmt.Errorf("snapshot record got LSN %d, expected %d", got, lsn)
		v.fail(err)
		return SnapshotInfo{}, err
	}
	if err := v.syncWAL(lsn); err != nil {
		return SnapshotInfo{}, err
	}
	// The record is durable: the snapshot exists. A failure from here on
	// stops the volume; reopening activates the snapshot from its record.
	if err := v.commitSnapMeta(); err != nil {
		v.fail(err)
		return SnapshotInfo{}, ioError(err)
	}
	v.snaps.mu.Lock()
	v.snaps.list, v.snaps.nextID = list, nextID
	v.snaps.mu.Unlock()
	v.log.Info("engine_snapshot_created", "snapshot", info.Name, "id", info.ID, "uuid", info.UUID,
		"lsn", info.LSN, "size", info.SizeBytes, "origin", origin, "snapshots", len(list))
	return s.infoNow(), nil
}

// DeleteSnapshot deletes the snapshot name and gives its space back. It
// fails with ErrSnapshotNotFound, or ErrSnapshotBusy while a
// SnapshotReader of it is open.
func (v *Volume) DeleteSnapshot(name string) error {
	v.snaps.opMu.Lock()
	defer v.snaps.opMu.Unlock()
	v.ioMu.RLock()
	defer v.ioMu.RUnlock()
	if err := v.snapOpCheck(); err != nil {
		return fmt.Errorf("blockvol: delete snapshot %q: %w", name, err)
	}
	v.snaps.mu.Lock()
	i := findSnap(v.snaps.list, name)
	if i < 0 {
		v.snaps.mu.Unlock()
		return fmt.Errorf("blockvol: delete snapshot %q: %w", name, ErrSnapshotNotFound)
	}
	s := v.snaps.list[i]
	if s.refs > 0 {
		n := s.refs
		v.snaps.mu.Unlock()
		return fmt.Errorf("blockvol: delete snapshot %q: %d reader(s) open: %w", name, n, ErrSnapshotBusy)
	}
	s.deleting = true
	v.snaps.mu.Unlock()
	payload, err := snapPayload(s.info).Encode()
	if err == nil {
		err = v.snapshotDeleteLocked(s, wal.Record{Type: wal.SnapshotDelete, Length: uint32(len(payload)), Payload: payload}, false, "primary")
	}
	if err != nil {
		v.snaps.mu.Lock()
		s.deleting = false
		v.snaps.mu.Unlock()
		return fmt.Errorf("blockvol: delete snapshot %q: %w", name, err)
	}
	return nil
}

// snapshotDeleteLocked deletes s with record rec (LSN fixed on a
// replica). The caller holds opMu and ioMu (shared: writes go on).
//
// Order: the blocks s holds that the previous snapshot lacks are copied
// into it, and from then on the flusher preserves into both (so the
// previous one stays complete, and s too should the delete fail before
// its record); the new metadata is staged; the record is appended and
// synced while the checkpoint is kept before it (so recovery sees it if
// the metadata commit does not happen); the metadata is committed and
// the file removed.
func (v *Volume) snapshotDeleteLocked(s *snapshot, rec wal.Record, fixed bool, origin string) error {
	held := s.heldBytes()
	// The bulk of the copy runs with the flusher going (s's entries do
	// not change, and the previous snapshot reads the same either way);
	// only what the flusher added to s meanwhile is copied with it
	// paused, so writers do not wait for a long merge.
	merged, err := v.mergeIntoOlder(s)
	if err != nil {
		return err
	}
	v.flushMu.Lock()
	more, err := v.mergeIntoOlder(s)
	if err == nil {
		s.merged.Store(true)
	}
	v.flushMu.Unlock()
	if err != nil {
		return err
	}
	merged += more
	undo := func() {
		v.flushMu.Lock()
		s.merged.Store(false)
		v.flushMu.Unlock()
	}
	list, nextID := v.listWithout(s)
	if err := v.stageSnapMeta(list, nextID, []uint64{s.info.ID}); err != nil {
		undo()
		return err
	}
	// appendRecord sets the ceiling to the record's LSN.
	defer v.ckptCeil.Store(0)
	lsn, err := v.appendRecord(rec, fixed)
	if err != nil {
		v.unstageSnapMeta()
		undo()
		return err
	}
	if err := v.syncWAL(lsn); err != nil {
		return err
	}
	if err := v.commitDelete(s, list); err != nil {
		v.fail(err)
		return ioError(err)
	}
	v.log.Info("engine_snapshot_deleted", "snapshot", s.info.Name, "id", s.info.ID, "lsn", lsn,
		"merged_blocks", merged, "freed_bytes", held, "origin", origin, "snapshots", len(list))
	return nil
}

func (v *Volume) listWithout(s *snapshot) ([]*snapshot, uint64) {
	v.snaps.mu.RLock()
	defer v.snaps.mu.RUnlock()
	var list []*snapshot
	for _, o := range v.snaps.list {
		if o != s {
			list = append(list, o)
		}
	}
	return list, v.snaps.nextID
}

// commitDelete commits the staged metadata without s, drops s from the
// list and removes its file.
func (v *Volume) commitDelete(s *snapshot, list []*snapshot) error {
	if err := v.commitSnapMeta(); err != nil {
		return err
	}
	v.snaps.mu.Lock()
	v.snaps.list = list
	s.gone.Store(true)
	err := v.removeSnapFile(s)
	v.snaps.mu.Unlock()
	return err
}

// mergeIntoOlder copies the blocks s holds that the snapshot before it
// lacks (and that lie inside that snapshot's size) into it: after that
// the older one reads the same without s. Idempotent; safe with the
// flusher running (it only adds to s, or to both once s is merged).
func (v *Volume) mergeIntoOlder(s *snapshot) (int, error) {
	list := v.snapList()
	i := slices.Index(list, s)
	if i <= 0 {
		return 0, nil
	}
	return v.mergeInto(s, list[i-1])
}

// applySnapshotRecord applies a snapshot record from the primary
// (ApplyRecord): the same steps as CreateSnapshot or DeleteSnapshot at
// the record's point in the stream.
func (v *Volume) applySnapshotRecord(rec wal.Record) error {
	v.snaps.opMu.Lock()
	defer v.snaps.opMu.Unlock()
	v.ioMu.Lock()
	defer v.ioMu.Unlock()
	if err := v.snapOpCheck(); err != nil {
		return fmt.Errorf("blockvol: apply record: %w", err)
	}
	if err := v.validateRecord(rec); err != nil {
		return fmt.Errorf("blockvol: apply record LSN %d: %v: %w", rec.LSN, err, blockdev.ErrInvalid)
	}
	if want := v.headLSN.Load() + 1; rec.LSN != want {
		return fmt.Errorf("blockvol: apply record LSN %d, expected %d: %w", rec.LSN, want, blockdev.ErrInvalid)
	}
	p, _ := wal.DecodeSnapshotPayload(rec.Payload)
	list := v.snapList()
	switch rec.Type {
	case wal.Snapshot:
		if findSnap(list, p.Name) >= 0 || findSnapID(list, p.ID) >= 0 {
			return fmt.Errorf("blockvol: apply snapshot record LSN %d: snapshot %q (id %d) already exists: %w", rec.LSN, p.Name, p.ID, blockdev.ErrInvalid)
		}
		if _, err := v.snapshotCreateLocked(payloadInfo(p, rec.LSN), rec, true, "replica"); err != nil {
			return fmt.Errorf("blockvol: apply snapshot record LSN %d (%q): %w", rec.LSN, p.Name, err)
		}
	case wal.SnapshotDelete:
		i := findSnapID(list, p.ID)
		if i < 0 {
			// Not here (a replica rebuilt without it): keep the record
			// for the LSN sequence, nothing else to do.
			_, err := v.appendRecord(rec, true)
			v.ckptCeil.Store(0) // appendRecord set it for a delete; nothing to commit here
			if err != nil {
				return fmt.Errorf("blockvol: apply record: %w", err)
			}
			v.log.Info("engine_snapshot_delete_absent", "snapshot", p.Name, "id", p.ID, "lsn", rec.LSN)
			return nil
		}
		// Readers of it on a replica do not hold the primary back: they
		// fail with ErrSnapshotNotFound from now on.
		if err := v.snapshotDeleteLocked(list[i], rec, true, "replica"); err != nil {
			return fmt.Errorf("blockvol: apply snapshot delete record LSN %d (%q): %w", rec.LSN, p.Name, err)
		}
	}
	return nil
}

// validateSnapshotRecord checks a snapshot record's payload.
func (v *Volume) validateSnapshotRecord(rec wal.Record) error {
	if rec.Offset != 0 {
		return fmt.Errorf("%s record with offset %d", rec.Type, rec.Offset)
	}
	if uint64(len(rec.Payload)) != uint64(rec.Length) {
		return fmt.Errorf("%s payload %d bytes, length %d", rec.Type, len(rec.Payload), rec.Length)
	}
	p, err := wal.DecodeSnapshotPayload(rec.Payload)
	if err != nil {
		return err
	}
	if err := CheckSnapshotName(p.Name); err != nil {
		return err
	}
	if err := checkUUID(p.UUID); err != nil {
		return err
	}
	switch {
	case p.ID == 0:
		return fmt.Errorf("snapshot ID 0")
	case p.Size <= 0 || p.Size%v.bs != 0:
		return fmt.Errorf("snapshot size %d not a positive multiple of the %d-byte block", p.Size, v.bs)
	}
	return nil
}

// recoverSnapshotRecord handles a snapshot record after the checkpoint
// during recovery (pos: where it starts). A Snapshot the metadata does
// not list is activated at its point: what precedes it is flushed to the
// extent first. A SnapshotDelete of a listed snapshot is completed.
func (v *Volume) recoverSnapshotRecord(pos uint64, rec wal.Record) error {
	p, err := wal.DecodeSnapshotPayload(rec.Payload)
	if err != nil {
		return err
	}
	list := v.snaps.list
	switch rec.Type {
	case wal.Snapshot:
		if findSnapID(list, p.ID) >= 0 || p.ID < v.snaps.nextID {
			return nil // listed, or created and deleted since
		}
		if v.dirty.len() > 0 || v.zeros.n.Load() > 0 {
			if err := v.applyToExtent(pos, ^uint64(0)); err != nil {
				return fmt.Errorf("flush before snapshot %q: %w", p.Name, err)
			}
			v.sb.CheckpointLSN, v.sb.CheckpointPos = rec.LSN-1, pos
			if err := v.persistSuperblock(); err != nil {
				return err
			}
		}
		info := payloadInfo(p, rec.LSN)
		s, err := v.createSnapFile(info)
		if err != nil {
			return err
		}
		nl := append(slices.Clip(list), s)
		if err := v.writeSnapMeta(nl, max(v.snaps.nextID, p.ID+1), nil); err != nil {
			return err
		}
		v.snaps.list, v.snaps.nextID = nl, max(v.snaps.nextID, p.ID+1)
		v.log.Info("engine_snapshot_activated_on_recovery", "snapshot", p.Name, "id", p.ID, "lsn", rec.LSN, "uuid", p.UUID)
	case wal.SnapshotDelete:
		i := findSnapID(list, p.ID)
		if i < 0 {
			return nil
		}
		s := list[i]
		if _, err := v.mergeIntoOlder(s); err != nil {
			return err
		}
		nl, nextID := v.listWithout(s)
		if err := v.stageSnapMeta(nl, nextID, []uint64{s.info.ID}); err != nil {
			return err
		}
		if err := v.commitDelete(s, nl); err != nil {
			return err
		}
		v.log.Info("engine_snapshot_delete_completed_on_recovery", "snapshot", p.Name, "id", p.ID, "lsn", rec.LSN)
	}
	return nil
}
