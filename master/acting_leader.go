package master

import (
	"fmt"
	"time"

	"github.com/blockd/blockd/api"
)

// The leader's side of the acting set: it gathers each volume's state,
// asks DecideActingSet, and commits a change as one raft command (epoch+1).

// BlockerQuorumLost is the preflight blocker when too few acting-set
// members are candidates to be sure the best of them holds every
// acknowledged write.
const BlockerQuorumLost = "acting_quorum_lost"

func (m *Master) actingThresholds() ActingThresholds {
	return ActingThresholds{LeaseTTL: m.cfg.LeaseTTL, FailGrace: m.cfg.FailGrace, SlowGrace: m.cfg.LeaseTTL, GrowAfter: m.cfg.HeartbeatInterval}
}

// actingInput gathers v's state for DecideActingSet. Caller holds m.mu.
func (m *Master) actingInput(ld *leaderState, v *VolumeRecord, now time.Time) ActingInput {
	in := ActingInput{Durability: v.Durability, RF: v.RF, MinCopies: v.EffectiveMinCopies()}
	if ls := ld.servers[v.Primary]; ls != nil && v.Primary != "" && v.Failure == nil && ld.pending[v.Name] == nil {
		if r, ok := ls.reports[v.Name]; ok && r.Role == api.RolePrimary && r.Epoch == v.Epoch && now.Sub(ls.heard) <= m.suspectAfter() {
			in.PrimaryAlive = true
		}
	}
	tr := ld.tracks[v.Name]
	if tr != nil && (tr.ID != v.ID || tr.Epoch != v.Epoch) {
		tr = nil
	}
	for _, id := range v.Replicas {
		mv := MemberView{ID: id, InSet: v.inActing(id), Silent: now.Sub(ld.lastSeen(id)), InSyncFor: -1}
		if ls := ld.servers[id]; ls != nil {
			mv.Alive = now.Sub(ls.heard) <= m.cfg.freshWindow()
		}
		if tr != nil {
			if t, ok := tr.Members[id]; ok {
				mv.State, mv.FlushedLSN = t.State, t.FlushedLSN
				if !t.BadSince.IsZero() {
					mv.BadFor = max(now.Sub(t.BadSince), time.Nanosecond)
				}
				if !t.InSyncAt.IsZero() {
					mv.InSyncFor = now.Sub(t.InSyncAt)
				}
				if !t.NotInSync.IsZero() {
					mv.SlowFor = now.Sub(t.NotInSync)
				}
			}
		}
		in.Members = append(in.Members, mv)
	}
	return in
}

type actingChange struct {
	v *VolumeRecord
	d ActingDecision
}

// actingSweep decides and commits acting-set changes for every volume.
func (m *Master) actingSweep(now time.Time) {
	vols := m.fsm.volumes()
	var todo []actingChange
	m.mu.Lock()
	ld := m.ld
	if ld == nil {
		m.mu.Unlock()
		return
	}
	th := m.actingThresholds()
	for _, v := range vols {
		d := DecideActingSet(m.actingInput(ld, v, now), th)
		for _, k := range d.Kept {
			if key := fmt.Sprintf("kept/%s/%s@%d/%s", v.Name, k.ID, v.Epoch, k.Reason); !ld.unknownLogged[key] {
				ld.unknownLogged[key] = true
				m.log.Warn("acting_member_kept", "volume", v.Name, "epoch", v.Epoch, "member", k.ID, "reason", k.Reason,
					"acting_set", v.ActingSet, "min_copies", v.EffectiveMinCopies())
			}
		}
		if d.Acting != nil {
			todo = append(todo, actingChange{v: v, d: d})
		}
	}
	m.mu.Unlock()
	for _, c := range todo {
		m.commitActing(c.v, c.d)
	}
}

// commitActing commits one acting-set decision (compare-and-set on the
// incarnation and epoch, epoch+1) and logs each member's change.
func (m *Master) commitActing(v *VolumeRecord, d ActingDecision) {
	res := m.apply(command{Op: opSetActing, Name: v.Name, ID: v.ID, ExpectEpoch: v.Epoch, ActingSet: d.Acting})
	if res.Err != nil {
		m.log.Warn("acting_set_apply_failed", "volume", v.Name, "epoch", v.Epoch, "acting_set", d.Acting, "err", res.Err)
		return
	}
	for _, c := range d.Removed {
		m.log.Info("acting_set_shrunk", "volume", v.Name, "epoch", res.Vol.Epoch, "member", c.ID, "reason", c.Reason,
			"acting_set", res.Vol.ActingSet, "stale", res.Vol.Stale(), "min_copies", res.Vol.EffectiveMinCopies())
	}
	for _, c := range d.Added {
		m.log.Info("acting_set_grown", "volume", v.Name, "epoch", res.Vol.Epoch, "member", c.ID, "reason", c.Reason,
			"acting_set", res.Vol.ActingSet, "stale", res.Vol.Stale(), "min_copies", res.Vol.EffectiveMinCopies())
	}
}

// failoverQuorum applies FailoverQuorumOK to evaluated candidates.
func (m *Master) failoverQuorum(v *VolumeRecord, cands []api.Candidate) (ok bool, need, eligible int) {
	if len(v.Replicas) == 0 {
		return true, 0, 0 // nothing to fail over to: no guard to report
	}
	for _, c := range cands {
		if c.Eligible && v.inActing(c.ServerID) {
			eligible++
		}
	}
	ok, need = FailoverQuorumOK(v.Durability, v.RF, v.EffectiveMinCopies(), len(v.ActingSet), eligible)
	return ok, need, eligible
}

// updatePolicy applies an UpdateVolumeRequest (epoch+1, so the primary
// receives the new policy with a new assignment).
func (m *Master) updatePolicy(v *VolumeRecord, req api.UpdateVolumeRequest) (*VolumeRecord, *api.Error) {
	if req.MinCopies == nil {
		return v, nil
	}
	n := *req.MinCopies
	switch {
	case n < 0:
		return nil, api.Errorf(api.CodeBadRequest, "min_copies %d must be at least 1 (0 = the default)", n)
	case n == 0:
		n = DefaultMinCopies(v.RF, v.Durability)
	}
	if e := ValidateMinCopies(n, v.RF); e != nil {
		return nil, e
	}
	if n == v.EffectiveMinCopies() && v.MinCopies != 0 {
		return v, nil
	}
	res := m.apply(command{Op: opUpdatePolicy, Name: v.Name, ID: v.ID, MinCopies: n})
	if res.Err != nil {
		return nil, res.Err
	}
	m.log.Info("volume_policy_updated", "volume", v.Name, "epoch", res.Vol.Epoch, "min_copies", n, "old_min_copies", v.EffectiveMinCopies())
	return res.Vol, nil
}
