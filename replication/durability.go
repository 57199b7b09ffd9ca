package replication

import (
	"fmt"
	"sort"
	"strings"
)

// Durability is a volume's flush rule (docs/ARCHITECTURE.md, replication).
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

// FlushRule is what the durability rule counts at one epoch: the mode,
// the replication factor, the acting set (the replicas that count) and the
// floor of durable copies.
type FlushRule struct {
	Mode Durability
	// RF is 1 + the number of assigned replicas (members or not): the
	// majority of sync_quorum is taken of it.
	RF int
	// Members are the acting set: IDs of the replicas that count. A
	// replica outside it is shipped to but never counted.
	Members []string
	// MinCopies: durable copies, the primary's included, that every flush
	// needs (0 is taken as 1).
	MinCopies int
}

// Outcome of a flush decision.
type Outcome int

const (
	// Succeed: the flush is acknowledged.
	Succeed Outcome = iota
	// Wait: enough acting-set members are InSync; their barrier answers
	// are outstanding. A slow disk is slow, not dead: no deadline.
	Wait
	// Blocked: the members as they are now cannot acknowledge the flush;
	// only a member returning to InSync or a new assignment can. The
	// caller waits for either, bounded, then fails with EIO.
	Blocked
)

func (o Outcome) String() string { return [...]string{"succeed", "wait", "blocked"}[o] }

// FlushDecision says what a flush at LSN lsn does now. The local fsync is
// assumed done (the primary counts for itself).
type FlushDecision struct {
	Outcome Outcome
	// Reason is a stable word: all_durable, quorum_durable, min_copies_durable,
	// awaiting_barrier, awaiting_quorum, awaiting_min_copies,
	// replica_not_in_sync, quorum_unreachable, below_min_copies.
	Reason string
	// Rule names the rule that decided (sync_all, sync_quorum, min_copies).
	Rule string
	// Missing lists the acting-set members that keep the flush from
	// succeeding (not InSync, or behind lsn).
	Missing []string
	// Copies is the number of durable copies at lsn (the primary's
	// included); Need the number the rule asks for.
	Copies, Need int
	// Detail is the human-readable proof: members, states, LSNs.
	Detail string
}

// DecideFlush applies the durability rule to the replicas' current states.
// It is pure: callers re-evaluate whenever a barrier reply, a state change
// or a new assignment arrives, so many waiting flushes complete from one
// reply. Only acting-set members whose state is InSync and whose
// FlushedLSN ≥ lsn count as copies (copies = 1 + those members):
//
//	sync_all:    every member durable, and copies ≥ MinCopies;
//	sync_quorum: copies ≥ max(RF/2+1, MinCopies);
//	best_effort: copies ≥ MinCopies.
//
// When the InSync members could reach the rule once their barriers are
// answered the outcome is Wait, otherwise Blocked. A member named in the
// rule that is not among replicas counts as disconnected.
func DecideFlush(rule FlushRule, replicas []ReplicaProgress, lsn uint64) FlushDecision {
	minc := max(rule.MinCopies, 1)
	durable, inSync, members := 0, 0, len(rule.Members)
	for _, id := range rule.Members {
		if r, ok := findProgress(replicas, id); ok && r.State.CountsForBarrier() {
			inSync++
			if r.FlushedLSN >= lsn {
				durable++
			}
		}
	}
	copies, possible := 1+durable, 1+inSync
	d := FlushDecision{Copies: copies}
	rf := max(rule.RF, 1+members)
	switch rule.Mode {
	case SyncAll:
		d.Need, d.Rule = max(1+members, minc), "sync_all"
		switch {
		case durable == members && copies >= minc:
			d.Outcome, d.Reason = Succeed, "all_durable"
		case inSync < members:
			d.Outcome, d.Reason = Blocked, "replica_not_in_sync"
		case possible < minc:
			d.Outcome, d.Reason, d.Rule = Blocked, "below_min_copies", "min_copies"
		default:
			d.Outcome, d.Reason = Wait, "awaiting_barrier"
		}
	case SyncQuorum:
		majority := rf/2 + 1
		d.Need, d.Rule = max(majority, minc), "sync_quorum"
		switch {
		case copies >= d.Need:
			d.Outcome, d.Reason = Succeed, "quorum_durable"
		case possible < majority:
			d.Outcome, d.Reason = Blocked, "quorum_unreachable"
		case possible < minc:
			d.Outcome, d.Reason, d.Rule = Blocked, "below_min_copies", "min_copies"
		default:
			d.Outcome, d.Reason = Wait, "awaiting_quorum"
		}
	default:
		d.Need, d.Rule = minc, "min_copies"
		switch {
		case copies >= minc:
			d.Outcome, d.Reason = Succeed, "min_copies_durable"
		case possible < minc:
			d.Outcome, d.Reason = Blocked, "below_min_copies"
		default:
			d.Outcome, d.Reason = Wait, "awaiting_min_copies"
		}
	}
	if d.Outcome == Succeed {
		return d
	}
	// Not acknowledged yet: name the members that keep it from succeeding
	// (the ones not InSync when blocked, the ones behind when waiting).
	var facts []string
	for _, id := range rule.Members {
		r, ok := findProgress(replicas, id)
		switch {
		case !ok:
			facts = append(facts, id+": not an assigned replica")
		case !r.State.CountsForBarrier():
			facts = append(facts, fmt.Sprintf("%s: %s flushed=%d", id, r.State, r.FlushedLSN))
		case r.FlushedLSN < lsn:
			facts = append(facts, fmt.Sprintf("%s: in_sync flushed=%d", id, r.FlushedLSN))
		default:
			continue
		}
		if blocked := !ok || !r.State.CountsForBarrier(); blocked == (d.Outcome == Blocked) {
			d.Missing = append(d.Missing, id)
		}
	}
	need := fmt.Sprintf("at least %d copies", minc)
	switch rule.Mode {
	case SyncAll:
		need = fmt.Sprintf("every acting-set member durable and at least %d copies", minc)
	case SyncQuorum:
		need = fmt.Sprintf("%d durable copies (majority of RF %d, min_copies %d)", d.Need, rf, minc)
	}
	d.Detail = fmt.Sprintf("%s at LSN %d needs %s; acting set %v, min_copies %d, %d durable copies", rule.Mode, lsn, need, sortedCopy(rule.Members), minc, copies)
	if len(facts) > 0 {
		d.Detail += " (" + strings.Join(facts, ", ") + ")"
	}
	return d
}

func findProgress(replicas []ReplicaProgress, id string) (ReplicaProgress, bool) {
	for _, r := range replicas {
		if r.ID == id {
			return r, true
		}
	}
	return ReplicaProgress{}, false
}

func sortedCopy(s []string) []string {
	out := append([]string{}, s...)
	sort.Strings(out)
	return out
}
