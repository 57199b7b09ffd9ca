package replication

// Which snapshots a replica keeps, drops and is sent after a base
// transfer: a pure function of the primary's list and the replica's.

import "github.com/blockd/blockd/blockvol"

// EvSnapshotSyncPlanned is logged by the primary once per transfer, when
// it decides (keys: kind, keep, drop, send, reason, primary_snapshots,
// replica_snapshots); EvSnapshotsDropped by the replica when it applies
// the plan (dropped, kept, missing).
const (
	EvSnapshotSyncPlanned = "snapshot_sync_planned"
	EvSnapshotsDropped    = "snapshots_dropped"
)

// Reasons of a SnapshotSyncPlan.
const (
	SnapSyncSame        = "same_snapshots"       // the replica holds exactly the primary's
	SnapSyncReplicaNone = "replica_has_none"     // all are sent
	SnapSyncNewestKept  = "newest_kept"          // the replica's copies of the primary's newest are kept, older ones sent
	SnapSyncNoneKept    = "newest_not_held"      // the replica lacks the primary's newest: all dropped, all sent
	SnapSyncPrimaryNone = "primary_has_none"     // the replica's are all dropped
	SnapSyncKeptDeleted = "kept_deleted_at_send" // the snapshot the kept ones start with was deleted meanwhile
)

// SnapshotSyncPlan says how a replica comes to hold exactly the primary's
// snapshots. Keep and Send are the primary's (oldest first); Keep are
// those the replica holds already, Send the ones to install, each older
// than every kept one (blockvol.InstallSnapshot installs newest first,
// below the snapshots present). Drop are the replica's others.
type SnapshotSyncPlan struct {
	Keep   []blockvol.SnapshotInfo
	Drop   []SnapRef
	Send   []blockvol.SnapshotInfo
	Reason string
}

// sameSnap: the replica's snapshot r is the primary's p (the same record:
// ID, UUID, LSN and name).
func sameSnap(p blockvol.SnapshotInfo, r SnapRef) bool {
	return p.UUID == r.UUID && p.ID == r.ID && p.LSN == r.LSN && p.Name == r.Name
}

// PlanSnapshotSync decides from primary (the snapshots the replica must
// end up with, oldest first) and replica (those it holds). The rule: the
// longest run of the primary's newest snapshots that the replica holds
// is kept, every other snapshot of the replica is dropped and the rest of
// the primary's are sent. A replica that lacks the primary's newest
// (a snapshot taken during its gap) therefore gets them all again: the
// simple rule, correct whatever the gap did.
func PlanSnapshotSync(primary []blockvol.SnapshotInfo, replica []SnapRef) SnapshotSyncPlan {
	held := func(p blockvol.SnapshotInfo) bool {
		for _, r := range replica {
			if sameSnap(p, r) {
				return true
			}
		}
		return false
	}
	k := len(primary)
	for k > 0 && held(primary[k-1]) {
		k--
	}
	plan := SnapshotSyncPlan{Keep: primary[k:], Send: primary[:k]}
	for _, r := range replica {
		kept := false
		for _, p := range plan.Keep {
			if sameSnap(p, r) {
				kept = true
				break
			}
		}
		if !kept {
			plan.Drop = append(plan.Drop, r)
		}
	}
	switch {
	case len(plan.Send) == 0 && len(plan.Drop) == 0:
		plan.Reason = SnapSyncSame
	case len(primary) == 0:
		plan.Reason = SnapSyncPrimaryNone
	case len(replica) == 0:
		plan.Reason = SnapSyncReplicaNone
	case len(plan.Keep) > 0:
		plan.Reason = SnapSyncNewestKept
	default:
		plan.Reason = SnapSyncNoneKept
	}
	if len(plan.Keep) == 0 {
		plan.Keep = nil
	}
	if len(plan.Send) == 0 {
		plan.Send = nil
	}
	return plan
}

// snapRefs lists infos as a replica reports them.
func snapRefs(list []blockvol.SnapshotInfo) []SnapRef {
	out := make([]SnapRef, 0, len(list))
	for _, in := range list {
		out = append(out, SnapRef{ID: in.ID, LSN: in.LSN, UUID: in.UUID, Name: in.Name})
	}
	return out
}
