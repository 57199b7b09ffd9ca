package replication

// Snapshots on the primary. The engine appends each operation to the WAL
// (a snapshot record for create and delete, ordinary write and zero
// records for a restore's rewrites), so replicas follow by plain shipping
// in LSN order; what the Primary adds is authority (the write gate: role,
// epoch, lease) before the engine call and, after it, the same flush a
// client's FLUSH gets, so the operation is durable on the acting set per
// the durability mode (sync_all: every member) before it is reported done.

import (
	"fmt"
	"time"

	"github.com/blockd/blockd/blockvol"
)

// Event names of snapshot operations (primary side).
const (
	EvSnapshotCreated  = "snapshot_created"  // volume, snapshot, id, lsn, epoch, took
	EvSnapshotDeleted  = "snapshot_deleted"  // volume, snapshot, epoch, took
	EvSnapshotRestored = "snapshot_restored" // volume, snapshot, lsn, head_lsn, epoch, took
	EvSnapshotFailed   = "snapshot_failed"   // volume, op, snapshot, stage (authority|engine|durability), err
	// EvSnapshotSkipped (replica side): a snapshot record arrived during a
	// base transfer and is kept as absent (receiver.go).
	EvSnapshotSkipped = "snapshot_skipped" // lsn, reason, transfer, reset_lsn
)

// CheckAuthority reports why this primary may not act on its volume now
// (not primary, epoch not persisted, lease run out), or nil: the write
// gate every client request passes. The error wraps blockdev.ErrNotPrimary.
func (p *Primary) CheckAuthority() error { return p.gate() }

func (p *Primary) snapFailed(op, name, stage string, err error) error {
	p.log.Warn(EvSnapshotFailed, "op", op, "snapshot", name, "stage", stage, "epoch", p.Epoch(), "err", err.Error())
	switch stage {
	case "durability":
		return fmt.Errorf("snapshot %s: %s done on the primary but not durable on the replicas per %s: %w", name, op, p.modeName(), err)
	default:
		return fmt.Errorf("snapshot %s: %s: %w", name, op, err)
	}
}

func (p *Primary) modeName() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode.String()
}

// CreateSnapshot takes a snapshot covering every write acknowledged before
// the call, and returns once its record is durable locally and, per the
// durability mode, on the acting set's replicas.
func (p *Primary) CreateSnapshot(name string, o blockvol.SnapshotOptions) (blockvol.SnapshotInfo, error) {
	const op = "create"
	if err := blockvol.CheckSnapshotName(name); err != nil {
		return blockvol.SnapshotInfo{}, err
	}
	eng := p.vol
	if err := p.gate(); err != nil {
		return blockvol.SnapshotInfo{}, p.snapFailed(op, name, "authority", err)
	}
	start := time.Now()
	info, err := eng.CreateSnapshot(name, o)
	p.pumpSoon()
	if err != nil {
		return blockvol.SnapshotInfo{}, p.snapFailed(op, name, "engine", err)
	}
	if err := p.sync(); err != nil {
		return info, p.snapFailed(op, name, "durability", err)
	}
	p.log.Info(EvSnapshotCreated, "snapshot", name, "id", info.ID, "lsn", info.LSN, "epoch", p.Epoch(), "took", time.Since(start).String())
	return info, nil
}

// DeleteSnapshot deletes a snapshot (a record in LSN order too) and
// returns once that is durable per the durability mode.
func (p *Primary) DeleteSnapshot(name string) error {
	const op = "delete"
	if err := blockvol.CheckSnapshotName(name); err != nil {
		return err
	}
	eng := p.vol
	if err := p.gate(); err != nil {
		return p.snapFailed(op, name, "authority", err)
	}
	start := time.Now()
	err := eng.DeleteSnapshot(name)
	p.pumpSoon()
	if err != nil {
		return p.snapFailed(op, name, "engine", err)
	}
	if err := p.sync(); err != nil {
		return p.snapFailed(op, name, "durability", err)
	}
	p.log.Info(EvSnapshotDeleted, "snapshot", name, "epoch", p.Epoch(), "took", time.Since(start).String())
	return nil
}

// RestoreSnapshot reverts the volume to the snapshot (the engine drains
// in-flight I/O and rewrites the changed blocks as ordinary records) and
// returns once the rewrite is durable per the durability mode, so every
// acting replica reads what the primary reads. The snapshot stays.
func (p *Primary) RestoreSnapshot(name string) (blockvol.SnapshotInfo, error) {
	const op = "restore"
	if err := blockvol.CheckSnapshotName(name); err != nil {
		return blockvol.SnapshotInfo{}, err
	}
	eng := p.vol
	if err := p.gate(); err != nil {
		return blockvol.SnapshotInfo{}, p.snapFailed(op, name, "authority", err)
	}
	info, err := eng.SnapshotInfo(name)
	if err != nil {
		return blockvol.SnapshotInfo{}, p.snapFailed(op, name, "engine", err)
	}
	start := time.Now()
	err = eng.RestoreSnapshot(name)
	p.pumpSoon()
	if err != nil {
		return info, p.snapFailed(op, name, "engine", err)
	}
	if err := p.sync(); err != nil {
		return info, p.snapFailed(op, name, "durability", err)
	}
	p.log.Info(EvSnapshotRestored, "snapshot", name, "lsn", info.LSN, "head_lsn", p.vol.HeadLSN(), "epoch", p.Epoch(), "took", time.Since(start).String())
	return info, nil
}

// Snapshots lists the volume's snapshots, oldest first, while this
// primary holds its authority (a deposed primary's list may be stale).
func (p *Primary) Snapshots() ([]blockvol.SnapshotInfo, error) {
	eng := p.vol
	if err := p.gate(); err != nil {
		return nil, err
	}
	return eng.Snapshots(), nil
}
