package replication

import "fmt"

// Facts are what the primary knows about one replica when a session
// (re)starts: the replica's handshake answer plus the primary's own WAL.
type Facts struct {
	ReplicaFlushed uint64 // R: the replica's FlushedLSN
	ReplicaHead    uint64 // the replica's head (≥ R; records beyond R are not yet durable)
	PrimaryHead    uint64 // H
	OldestRetained uint64 // S: first LSN still readable from the primary's WAL (H+1 when empty)
	Blank          bool   // the replica has never held data
	Trusted        bool   // the replica's image is consistent (no interrupted transfer, no divergent history)
	// BitmapFrom: the primary's dirty-region bitmap for this replica covers
	// every record with LSN ≥ BitmapFrom; BitmapOK says whether one exists.
	BitmapOK   bool
	BitmapFrom uint64
	// ForkLSN: the replica's first record that is not the primary's (0:
	// none). DivergentKnown: the replica could list the regions its
	// records from ForkLSN on touched.
	ForkLSN        uint64
	DivergentKnown bool
	// Pending: the replica holds an interrupted transfer of PendingKind
	// begun at PendingEpoch. Epoch is the session's epoch: a transfer of
	// the same epoch whose WAL tail is still retained (S ≤ R+1) is resumed.
	HasPending   bool
	PendingEpoch uint64
	PendingKind  TransferKind
	Epoch        uint64
	// Escalated is the reason a catch-up of this replica was given up on
	// (budget, attempts, WAL recycled): the next plan moves data instead
	// of catching up. Empty: no escalation.
	Escalated string
}

// PendingResumable: the interrupted transfer can be continued.
func (f Facts) PendingResumable() bool {
	return f.HasPending && f.PendingEpoch == f.Epoch && f.OldestRetained <= f.ReplicaFlushed+1
}

// PlanKind is the recovery decision.
type PlanKind int

const (
	PlanInSync PlanKind = iota
	PlanCatchUp
	PlanResync
	PlanRebuild
	PlanTruncateThenCatchUp
	PlanResume
)

func (k PlanKind) String() string {
	return [...]string{"in_sync", "catch_up", "resync", "rebuild", "truncate_then_catch_up", "resume"}[k]
}

// Plan is the planner's answer. From/To is the LSN range to stream
// (catch-up), Reason a stable machine-readable word, Detail the proof
// with LSN values. ResetLSN (TruncateThenCatchUp) is the LSN the replica's
// log is cut back to; a resync or rebuild freezes its target at the
// primary's head when the transfer begins.
type Plan struct {
	Kind     PlanKind
	From, To uint64
	ResetLSN uint64
	Reason   string
	Detail   string
}

// Decide is the recovery planner: a pure function of the facts.
//
//	pending transfer of this epoch, S ≤ R+1 → Resume
//	untrusted                         → Rebuild (or Resume of the pending transfer)
//	blank, H = 0                      → InSync
//	blank, S ≤ 1                      → CatchUp [1, H]
//	blank                             → Rebuild
//	fork F ≤ H (history diverged)     → TruncateThenCatchUp from F (regions known, S ≤ F) | Rebuild
//	replica head > H                  → TruncateThenCatchUp (divergent regions known) | Rebuild
//	R = H                             → InSync
//	S ≤ R+1 ≤ H                       → CatchUp [R+1, H]
//	R+1 < S, bitmap covers R+1        → Resync (bitmap regions + WAL tail)
//	R+1 < S                           → Rebuild
//
// An escalated replica (Facts.Escalated) whose plan would be InSync or
// CatchUp is resynced instead when the bitmap covers R+1 and it is not
// blank, otherwise rebuilt.
func Decide(f Facts) Plan {
	p := decide(f)
	if f.Escalated == "" || (p.Kind != PlanCatchUp && p.Kind != PlanInSync) {
		return p
	}
	R := f.ReplicaFlushed
	if f.BitmapOK && f.BitmapFrom <= R+1 && !f.Blank {
		return Plan{Kind: PlanResync, From: R + 1, To: f.PrimaryHead, Reason: "escalated", Detail: f.Escalated}
	}
	return Plan{Kind: PlanRebuild, Reason: "escalated", Detail: f.Escalated}
}

func decide(f Facts) Plan {
	H, S, R := f.PrimaryHead, f.OldestRetained, f.ReplicaFlushed
	if f.PendingResumable() {
		return Plan{Kind: PlanResume, Reason: "pending_" + f.PendingKind.String(),
			Detail: fmt.Sprintf("resume interrupted %s; replica flushed=%d head=%d primary head=%d", f.PendingKind, R, f.ReplicaHead, H)}
	}
	if !f.Trusted {
		return Plan{Kind: PlanRebuild, Reason: "untrusted",
			Detail: fmt.Sprintf("replica image not trusted (flushed=%d head=%d); primary head=%d", R, f.ReplicaHead, H)}
	}
	if f.Blank {
		switch {
		case H == 0:
			return Plan{Kind: PlanInSync, Reason: "both_empty", Detail: "blank replica, empty primary"}
		case S <= 1:
			return Plan{Kind: PlanCatchUp, From: 1, To: H, Reason: "blank_wal_covers",
				Detail: fmt.Sprintf("blank replica; primary WAL retains [1,%d]", H)}
		default:
			return Plan{Kind: PlanRebuild, Reason: "blank",
				Detail: fmt.Sprintf("blank replica needs LSN 1 but oldest retained=%d head=%d", S, H)}
		}
	}
	if f.ForkLSN != 0 && f.ForkLSN <= H {
		// Diverged history below the primary's head (a partition healed,
		// a new primary wrote where the old one had): cut the replica back
		// to the fork, restore the regions its divergent records touched,
		// and catch up from the fork.
		if f.DivergentKnown && S <= f.ForkLSN {
			return Plan{Kind: PlanTruncateThenCatchUp, From: f.ForkLSN, To: H, ResetLSN: f.ForkLSN - 1, Reason: "diverged_history",
				Detail: fmt.Sprintf("replica records from LSN %d are not the primary's (replica head=%d, primary head=%d): truncate to %d", f.ForkLSN, f.ReplicaHead, H, f.ForkLSN-1)}
		}
		return Plan{Kind: PlanRebuild, Reason: "diverged_history_unrecoverable",
			Detail: fmt.Sprintf("replica diverges from LSN %d; divergent records readable=%v, primary oldest retained=%d", f.ForkLSN, f.DivergentKnown, S)}
	}
	if f.ReplicaHead > H || R > H {
		if f.DivergentKnown {
			return Plan{Kind: PlanTruncateThenCatchUp, From: H + 1, To: H, ResetLSN: H, Reason: "replica_ahead",
				Detail: fmt.Sprintf("replica head=%d flushed=%d beyond primary head=%d: truncate to %d", f.ReplicaHead, R, H, H)}
		}
		return Plan{Kind: PlanRebuild, Reason: "replica_ahead_unknown_tail",
			Detail: fmt.Sprintf("replica head=%d beyond primary head=%d and its divergent records are not readable", f.ReplicaHead, H)}
	}
	if R == H {
		return Plan{Kind: PlanInSync, Reason: "caught_up", Detail: fmt.Sprintf("replica flushed=%d = primary head", R)}
	}
	if S <= R+1 {
		return Plan{Kind: PlanCatchUp, From: R + 1, To: H, Reason: "wal_covers_gap",
			Detail: fmt.Sprintf("stream [%d,%d]; oldest retained=%d", R+1, H, S)}
	}
	if f.BitmapOK && f.BitmapFrom <= R+1 {
		return Plan{Kind: PlanResync, From: R + 1, To: H, Reason: "gap_beyond_retention",
			Detail: fmt.Sprintf("need LSN %d but oldest retained=%d; bitmap covers from %d", R+1, S, f.BitmapFrom)}
	}
	return Plan{Kind: PlanRebuild, Reason: "gap_beyond_retention_no_bitmap",
		Detail: fmt.Sprintf("need LSN %d but oldest retained=%d and no dirty bitmap covers it", R+1, S)}
}
