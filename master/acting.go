package master

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/blockd/blockd/api"
)

// The acting set: the replicas of a volume whose durable copies count for
// sync_all, sync_quorum and min_copies at the current epoch. It changes
// only by a raft decision of the leader (epoch+1); the primary learns it
// through its assignment and never changes it on its own. This file holds
// the pure parts: the per-member history the leader keeps from the
// primary's reports, the shrink/grow decision, the flush gate as
// `volume info` explains it, and the failover quorum guard.

// Acting-set change reasons (stable strings, logged and tested).
const (
	ActingReasonNoHeartbeat   = "no_heartbeat"          // silent for the lease TTL
	ActingReasonFailing       = "reported_failing"      // the primary reported it failing for FailGrace
	ActingReasonSlow          = "not_in_sync_too_long"  // the primary reported it anything but InSync for SlowGrace
	ActingReasonInSync        = "in_sync"               // the primary reported it InSync at this epoch
	ActingReasonFloor         = "below_min_copies"      // kept: removing it would drop the set below the floor
	ActingReasonRemainingLag  = "remaining_not_in_sync" // kept: the remaining members may lack acknowledged writes
	ActingReasonFailoverStale = "old_primary"           // the old primary leaves the set on failover
)

// MemberTrack is what the leader remembers of one replica from the
// primary's reports at the current epoch.
type MemberTrack struct {
	State      string    // the last reported state ("" = not reported)
	FlushedLSN uint64    // the last reported FlushedLSN
	BadSince   time.Time // reported failing continuously since (zero: not failing)
	InSyncAt   time.Time // reported InSync continuously since (zero: not InSync)
	NotInSync  time.Time // reported (or left out) not InSync continuously since (zero: InSync)
}

// VolumeTrack is the leader's history of one volume's primary reports. It
// is bound to an incarnation and epoch: any change starts it afresh, so a
// Connecting right after an epoch bump never counts as failing.
type VolumeTrack struct {
	ID, Epoch uint64
	Members   map[string]MemberTrack
}

// failingState: a state that, held for FailGrace, removes a member.
// Connecting is neutral (a dead peer alternates Disconnected and
// Connecting; a live one passes through it after an epoch bump): it
// neither starts nor clears the clock. CatchingUp is progress: it clears
// it (a catch-up that lasts is caught by SlowGrace instead). Rebuilding
// is failing: a rebuild outlasts any flush wait, and only InSync members
// answer barriers.
func failingState(s string) (failing, neutral bool) {
	switch s {
	case api.StateDisconnected, api.StateDegraded, api.StateNeedsRebuild, api.StateRebuilding:
		return true, false
	case api.StateConnecting, "":
		return false, true
	}
	return false, false
}

// TrackReport folds one primary report (rep, taken at now) into t, which
// may be nil. Reports at another incarnation or epoch than (id, epoch), or
// not from a primary, leave t as it is; a new epoch starts afresh.
func TrackReport(t *VolumeTrack, id, epoch uint64, rep api.HeartbeatVolume, now time.Time) *VolumeTrack {
	if rep.Role != api.RolePrimary || rep.Epoch != epoch || (rep.ID != 0 && rep.ID != id) {
		return t
	}
	if t == nil || t.ID != id || t.Epoch != epoch {
		t = &VolumeTrack{ID: id, Epoch: epoch, Members: map[string]MemberTrack{}}
	}
	seen := map[string]bool{}
	for _, r := range rep.Replicas {
		seen[r.ServerID] = true
		m := t.Members[r.ServerID]
		m.State, m.FlushedLSN = r.State, r.FlushedLSN
		failing, neutral := failingState(r.State)
		switch {
		case failing:
			if m.BadSince.IsZero() {
				m.BadSince = now
			}
		case !neutral:
			m.BadSince = time.Time{}
		}
		if r.State == api.StateInSync {
			if m.InSyncAt.IsZero() {
				m.InSyncAt = now
			}
			m.NotInSync = time.Time{}
		} else {
			m.InSyncAt = time.Time{}
			if m.NotInSync.IsZero() {
				m.NotInSync = now
			}
		}
		t.Members[r.ServerID] = m
	}
	for id, m := range t.Members {
		if !seen[id] { // not reported at all: neutral, but no longer InSync
			m.State, m.InSyncAt = "", time.Time{}
			if m.NotInSync.IsZero() {
				m.NotInSync = now
			}
			t.Members[id] = m
		}
	}
	return t
}

// MemberView is one replica as the acting-set decision sees it.
type MemberView struct {
	ID    string
	InSet bool
	// Alive: heartbeating within the fresh window. Silent: time since its
	// last heartbeat (since the leader started, if none).
	Alive  bool
	Silent time.Duration
	// From the primary's reports at the current epoch.
	State      string
	FlushedLSN uint64
	BadFor     time.Duration // reported failing continuously this long (0: not failing)
	SlowFor    time.Duration // reported anything but InSync continuously this long (0: InSync or unknown)
	InSyncFor  time.Duration // reported InSync continuously this long (-1: not InSync)
}

// ActingInput is a volume's state for DecideActingSet.
type ActingInput struct {
	Durability string
	RF         int
	MinCopies  int // effective (>= 1)
	// PrimaryAlive: the primary heartbeats and confirmed the current epoch.
	// Without it nothing changes: a lost primary is a failover, decided
	// after its lease, never a shrink around it.
	PrimaryAlive bool
	Members      []MemberView // every replica, in record order
}

// ActingThresholds are the timings of the decision.
type ActingThresholds struct {
	LeaseTTL  time.Duration // a member silent this long is dead
	FailGrace time.Duration // a member reported failing this long is removed
	SlowGrace time.Duration // a member reported anything but InSync this long is removed (0: never)
	GrowAfter time.Duration // a stale member reported InSync this long is added back
}

// MemberChange is one member entering, leaving or kept in the set.
type MemberChange struct {
	ID     string
	Reason string
}

// ActingDecision is the outcome of DecideActingSet. Acting is nil when the
// set does not change; otherwise it is the new set (record order).
type ActingDecision struct {
	Acting  []string
	Removed []MemberChange
	Added   []MemberChange
	Kept    []MemberChange // failing members kept in the set, with why
}

// RequiredCopies is how many durable copies (the primary's included) a
// flush needs with acting members in the set: every member under
// sync_all (and at least MinCopies), max(majority of RF, MinCopies) under
// sync_quorum, MinCopies under best_effort.
func RequiredCopies(durability string, rf, minCopies, acting int) int {
	switch durability {
	case api.DurabilitySyncAll:
		return max(1+acting, minCopies)
	case api.DurabilitySyncQuorum:
		return max(rf/2+1, minCopies)
	}
	return max(minCopies, 1)
}

// floor is the size (primary included) below which the set does not shrink.
func floor(durability string, rf, minCopies int) int {
	if durability == api.DurabilitySyncQuorum {
		return max(rf/2+1, minCopies)
	}
	return max(minCopies, 1)
}

// DecideActingSet decides the next acting set of a volume. Pure.
//
//   - Grow: a stale member that is alive and reported InSync for at least
//     GrowAfter is added back.
//   - Shrink: a member silent for the lease TTL, reported failing
//     continuously for FailGrace, or anything but InSync for SlowGrace
//     (a catch-up or reconnect loop that does not end), is removed, as long as the set keeps the
//     floor (MinCopies; under sync_quorum also the majority of RF). Of the
//     dead members the ones with the highest FlushedLSN are the ones kept:
//     a kept member stays a failover candidate. Outside sync_all an
//     acknowledgement does not need every member, so a member is removed
//     only while every remaining member is InSync (it then holds every
//     acknowledged write).
//   - Nothing changes unless the primary is alive and confirmed the epoch.
func DecideActingSet(in ActingInput, th ActingThresholds) ActingDecision {
	var d ActingDecision
	if !in.PrimaryAlive {
		return d
	}
	set := map[string]bool{}
	for _, m := range in.Members {
		if m.InSet {
			set[m.ID] = true
		}
	}
	for _, m := range in.Members {
		if !m.InSet && m.Alive && m.State == api.StateInSync && m.InSyncFor >= th.GrowAfter {
			set[m.ID] = true
			d.Added = append(d.Added, MemberChange{ID: m.ID, Reason: ActingReasonInSync})
		}
	}
	var dead []MemberView
	for _, m := range in.Members {
		if !set[m.ID] {
			continue
		}
		switch {
		case m.Silent >= th.LeaseTTL:
			dead = append(dead, m)
		case m.BadFor > 0 && m.BadFor >= th.FailGrace:
			dead = append(dead, m)
		case th.SlowGrace > 0 && m.SlowFor >= th.SlowGrace:
			dead = append(dead, m)
		}
	}
	// Remove the least useful first: lowest FlushedLSN, then ID.
	sort.SliceStable(dead, func(i, j int) bool {
		if dead[i].FlushedLSN != dead[j].FlushedLSN {
			return dead[i].FlushedLSN < dead[j].FlushedLSN
		}
		return dead[i].ID < dead[j].ID
	})
	fl := floor(in.Durability, in.RF, in.MinCopies)
	for _, m := range dead {
		reason := ActingReasonFailing
		switch {
		case m.Silent >= th.LeaseTTL:
			reason = ActingReasonNoHeartbeat
		case m.BadFor == 0 || m.BadFor < th.FailGrace:
			reason = ActingReasonSlow
		}
		if 1+len(set)-1 < fl {
			d.Kept = append(d.Kept, MemberChange{ID: m.ID, Reason: ActingReasonFloor})
			continue
		}
		if in.Durability != api.DurabilitySyncAll && !othersInSync(in.Members, set, m.ID) {
			d.Kept = append(d.Kept, MemberChange{ID: m.ID, Reason: ActingReasonRemainingLag})
			continue
		}
		delete(set, m.ID)
		d.Removed = append(d.Removed, MemberChange{ID: m.ID, Reason: reason})
	}
	if len(d.Added) == 0 && len(d.Removed) == 0 {
		return d
	}
	d.Acting = []string{}
	for _, m := range in.Members {
		if set[m.ID] {
			d.Acting = append(d.Acting, m.ID)
		}
	}
	return d
}

func othersInSync(ms []MemberView, set map[string]bool, except string) bool {
	for _, m := range ms {
		if set[m.ID] && m.ID != except && m.State != api.StateInSync {
			return false
		}
	}
	return true
}

// FlushGate tells whether the primary can acknowledge a flush now, from
// the primary's report (InSync members of the acting set count), and why
// not. primaryOK is false when the primary has not confirmed the epoch or
// is silent.
func FlushGate(durability string, rf, minCopies int, acting []string, states map[string]string, primaryOK bool) (bool, string) {
	if !primaryOK {
		return false, "primary_not_confirmed: the primary has not reported this epoch recently"
	}
	inSync := 0
	var lagging []string
	for _, id := range acting {
		if states[id] == api.StateInSync {
			inSync++
		} else {
			lagging = append(lagging, id)
		}
	}
	copies := 1 + inSync
	need := RequiredCopies(durability, rf, minCopies, len(acting))
	switch {
	case copies < minCopies:
		return false, fmt.Sprintf("below_min_copies: %d durable copies of min_copies %d%s", copies, minCopies, lagNote(lagging))
	case durability == api.DurabilitySyncAll && len(lagging) > 0:
		return false, "sync_all: acting-set member(s) not InSync: " + strings.Join(lagging, ",")
	case copies < need:
		return false, fmt.Sprintf("below_quorum: %d durable copies of %d needed%s", copies, need, lagNote(lagging))
	}
	return true, ""
}

func lagNote(l []string) string {
	if len(l) == 0 {
		return ""
	}
	return " (not InSync: " + strings.Join(l, ",") + ")"
}

// FailoverQuorumOK reports whether promoting the best of the eligible
// acting-set candidates surely keeps every acknowledged write: an
// acknowledgement needed required-1 replica copies among acting members,
// so at least acting-required+2 of them must be candidates (sync_all: 1).
// With required <= 1 (best_effort, min_copies 1) nothing is promised.
func FailoverQuorumOK(durability string, rf, minCopies, acting, eligibleActing int) (bool, int) {
	req := RequiredCopies(durability, rf, minCopies, acting)
	if req <= 1 {
		return eligibleActing >= 1, 1
	}
	need := max(acting-req+2, 1)
	return eligibleActing >= need, need
}
