package replication

import (
	"fmt"
	"strings"
)

// Durability is a volume's flush rule (DESIGN §3).
type Durability int

const (
	BestEffort Durability = iota
	SyncAll
	SyncQuorum
)

func (d Durability) String() string {
	switch d {
	case SyncAll:
		return "sync_all"
	case SyncQuorum:
		return "sync_quorum"
	}
	return "best_effort"
}

// ParseDurability accepts best_effort, sync_all, sync_quorum.
func ParseDurability(s string) (Durability, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "best_effort", "":
		return BestEffort, nil
	case "sync_all":
		return SyncAll, nil
	case "sync_quorum":
		return SyncQuorum, nil
	}
	return BestEffort, fmt.Errorf("replication: unknown durability mode %q", s)
}

// ReplicaProgress is one replica as the durability rule sees it.
type ReplicaProgress struct {
	ID         string
	State      ReplicaState
	FlushedLSN uint64
}

// Outcome of a flush decision.
type Outcome int

const (
	Succeed Outcome = iota
	Wait
	Fail
)

func (o Outcome) String() string { return [...]string{"succeed", "wait", "fail"}[o] }

// FlushDecision says what a flush at LSN lsn does now. The local fsync is
// assumed done (the primary counts for itself).
type FlushDecision struct {
	Outcome Outcome
	Reason  string
	// Missing lists the replicas that keep the flush from succeeding.
	Missing []string
}

// DecideFlush applies the durability rule to the replicas' current states.
// It is pure: callers re-evaluate whenever a barrier reply or a state
// change arrives, so many waiting flushes complete from one reply.
//
//	best_effort: succeed.
//	sync_all:    every replica InSync with FlushedLSN ≥ lsn; any replica
//	             not InSync fails the flush; otherwise wait.
//	sync_quorum: majority of RF (replicas + primary) durable; fail when
//	             even every InSync replica could not make a majority.
func DecideFlush(mode Durability, replicas []ReplicaProgress, lsn uint64) FlushDecision {
	if mode == BestEffort || len(replicas) == 0 {
		return FlushDecision{Outcome: Succeed, Reason: mode.String()}
	}
	var durable, possible int
	var notInSync, behind []string
	for _, r := range replicas {
		if !r.State.CountsForBarrier() {
			notInSync = append(notInSync, r.ID)
			continue
		}
		possible++
		if r.FlushedLSN >= lsn {
			durable++
		} else {
			behind = append(behind, r.ID)
		}
	}
	switch mode {
	case SyncAll:
		if len(notInSync) > 0 {
			return FlushDecision{Outcome: Fail, Reason: "replica_not_in_sync", Missing: notInSync}
		}
		if len(behind) > 0 {
			return FlushDecision{Outcome: Wait, Reason: "awaiting_barrier", Missing: behind}
		}
		return FlushDecision{Outcome: Succeed, Reason: "all_durable"}
	case SyncQuorum:
		rf := len(replicas) + 1
		need := rf/2 + 1
		if 1+durable >= need {
			return FlushDecision{Outcome: Succeed, Reason: "quorum_durable"}
		}
		if 1+possible < need {
			return FlushDecision{Outcome: Fail, Reason: "quorum_unreachable", Missing: notInSync}
		}
		return FlushDecision{Outcome: Wait, Reason: "awaiting_quorum", Missing: behind}
	}
	return FlushDecision{Outcome: Fail, Reason: "unknown_mode"}
}
