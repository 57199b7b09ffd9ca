package master

import (
	"fmt"
	"net/http"
	"time"

	"github.com/blockd/blockd/api"
)

// The leader's side of a two-phase expand: hExpand records the intent and
// waits for its outcome; every monitor tick (expandSweep) decides each
// preparing expand (DecideExpand) from the members' heartbeats and commits
// or cancels it in raft. Assignments carry the intent to every member
// (expandAssign); the servers prepare, commit and cancel locally.

// expandPolicy: a member has the larger of 10s and two lease TTLs to
// prepare; one silent for the fresh window cancels at once.
func (m *Master) expandPolicy() ExpandPolicy {
	return ExpandPolicy{Timeout: max(10*time.Second, 2*m.cfg.LeaseTTL), SilentLimit: m.cfg.freshWindow()}
}

// expandMembers: the primary and the acting set; they must all prepare.
func expandMembers(v *VolumeRecord) []string {
	var out []string
	if v.Primary != "" {
		out = append(out, v.Primary)
	}
	return append(out, v.ActingSet...)
}

// expandAssign adds a preparing expand to an assignment.
func expandAssign(v *VolumeRecord, a *api.VolumeAssignment) {
	if e := v.preparing(); e != nil {
		a.ExpandID, a.ExpandSizeBytes = e.ID, e.SizeBytes
	}
}

// expandInputs gathers the leader's knowledge of e's members. Caller holds m.mu.
func expandInputs(ld *leaderState, v *VolumeRecord, e *ExpandRecord, now time.Time) []ExpandMember {
	var in []ExpandMember
	for _, id := range e.Members {
		em := ExpandMember{ServerID: id, SilentFor: now.Sub(ld.lastSeen(id))}
		if ls := ld.servers[id]; ls != nil {
			if r, ok := ls.reports[v.Name]; ok {
				em.Report = &r
			}
		}
		in = append(in, em)
	}
	return in
}

// expandSweep decides every preparing expand (the leader's monitor tick).
func (m *Master) expandSweep(now time.Time) {
	for _, v := range m.fsm.volumes() {
		if v.preparing() != nil {
			m.expandStep(v, now)
		}
	}
}

func (m *Master) expandStep(v *VolumeRecord, now time.Time) {
	e := v.preparing()
	m.mu.Lock()
	ld := m.ld
	if ld == nil {
		m.mu.Unlock()
		return
	}
	d := DecideExpand(e, v.ID, expandInputs(ld, v, e, now), now, m.expandPolicy())
	var newly []string
	for _, id := range d.Prepared {
		key := fmt.Sprintf("expand_prepared/%s/%d/%s", v.Name, e.ID, id)
		if !ld.unknownLogged[key] {
			ld.unknownLogged[key] = true
			newly = append(newly, id)
		}
	}
	m.mu.Unlock()
	for _, id := range newly {
		m.log.Info("expand_prepared", "volume", v.Name, "expand_id", e.ID, "server", id, "size", e.SizeBytes,
			"prepared", d.Prepared, "waiting", d.Waiting)
	}
	switch d.Action {
	case ExpandCommit:
		res := m.apply(command{Op: opExpandCommit, Name: v.Name, ID: e.ID})
		if res.Err != nil {
			m.log.Warn("expand_decision_not_applied", "volume", v.Name, "expand_id", e.ID, "action", d.Action.String(), "err", res.Err)
			return
		}
		m.log.Info("expand_committed", "volume", v.Name, "expand_id", e.ID, "from", e.FromBytes, "size", e.SizeBytes,
			"members", e.Members, "took_ms", now.Sub(time.UnixMilli(e.StartedUnixMS)).Milliseconds())
	case ExpandCancel:
		res := m.apply(command{Op: opExpandCancel, Name: v.Name, ID: e.ID, Failure: &VolumeFailureRecord{Server: d.Server, Reason: d.Reason}})
		if res.Err != nil {
			m.log.Warn("expand_decision_not_applied", "volume", v.Name, "expand_id", e.ID, "action", d.Action.String(), "err", res.Err)
			return
		}
		m.log.Warn("expand_cancelled", "volume", v.Name, "expand_id", e.ID, "size", e.SizeBytes, "server", d.Server,
			"cause", d.Cause, "reason", d.Reason, "prepared", d.Prepared, "waiting", d.Waiting)
	}
}

// expandStatus renders v's expand for VolumeInfo. Caller holds m.mu.
func expandStatus(ld *leaderState, v *VolumeRecord) *api.ExpandStatus {
	e := v.Expand
	if e == nil {
		return nil
	}
	st := &api.ExpandStatus{ID: e.ID, FromBytes: e.FromBytes, SizeBytes: e.SizeBytes, Phase: e.Phase,
		Members: append([]string{}, e.Members...), Server: e.Server, Reason: e.Reason}
	if e.Phase == api.ExpandPreparing {
		for _, id := range e.Members {
			if ls := ld.servers[id]; ls != nil {
				if r, ok := ls.reports[v.Name]; ok && preparedFor(e, v.ID, &r) {
					st.Prepared = append(st.Prepared, id)
				}
			}
		}
	}
	return st
}

// memberSizes lists each member's reported sizes (primary first). Caller holds m.mu.
func memberSizes(ld *leaderState, v *VolumeRecord) []api.MemberSize {
	var out []api.MemberSize
	for _, id := range v.Members() {
		if id == "" {
			continue
		}
		ms := api.MemberSize{ServerID: id}
		if ls := ld.servers[id]; ls != nil {
			if r, ok := ls.reports[v.Name]; ok {
				ms.SizeBytes, ms.PendingSizeBytes = r.SizeBytes, r.PendingSizeBytes
			}
		}
		out = append(out, ms)
	}
	return out
}

// expandWait bounds how long POST .../expand waits for the outcome before
// it answers 202 (the client then polls the volume): well within a
// client's answer timeout (the CLI's default is 3 s).
const expandWait = 1500 * time.Millisecond

// hExpand records a two-phase expand and answers its outcome: 200 with
// the volume once committed, 409 expand_cancelled naming the member and
// the cause, or 202 with the volume (Expand.Phase "preparing") when it has
// not ended within expandWait. A retry of the same size joins the expand
// in progress (or succeeds at once when the volume already has the size).
func (m *Master) hExpand(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	var req api.ExpandRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	name := r.PathValue("name")
	if req.SizeBytes <= 0 {
		writeErr(w, api.Errorf(api.CodeBadSize, "size must be positive (got %d)", req.SizeBytes))
		return
	}
	v := m.fsm.volume(name)
	if v == nil {
		writeErr(w, api.Errorf(api.CodeNotFound, "volume %q not found", name))
		return
	}
	intent := &ExpandRecord{SizeBytes: req.SizeBytes, Members: expandMembers(v), StartedUnixMS: time.Now().UnixMilli()}
	res := m.apply(command{Op: opExpandPrepare, Name: name, Expand: intent})
	if res.Err != nil {
		writeErr(w, res.Err)
		return
	}
	e := res.Vol.preparing()
	if e == nil { // already that size
		m.writeVolume(w, ld, res.Vol, http.StatusOK)
		return
	}
	if e.StartedUnixMS == intent.StartedUnixMS {
		m.log.Info("expand_started", "volume", name, "expand_id", e.ID, "from", e.FromBytes, "size", e.SizeBytes, "members", e.Members)
	}
	deadline := time.Now().Add(expandWait)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		v = m.fsm.volume(name)
		switch {
		case v == nil:
			writeErr(w, api.Errorf(api.CodeNotFound, "volume %q was deleted during its expand", name))
			return
		case v.Expand == nil || v.Expand.ID != e.ID:
			writeErr(w, api.Errorf(api.CodeInternal, "volume %q: expand %d was replaced", name, e.ID))
			return
		case v.Expand.Phase == api.ExpandCommitted:
			m.writeVolume(w, ld, v, http.StatusOK)
			return
		case v.Expand.Phase == api.ExpandCancelled:
			m.mu.Lock()
			e := expandStatus(ld, v).Err(name)
			m.mu.Unlock()
			writeErr(w, e)
			return
		case time.Now().After(deadline):
			m.writeVolume(w, ld, v, http.StatusAccepted)
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-tick.C:
		}
	}
}

func (m *Master) writeVolume(w http.ResponseWriter, ld *leaderState, v *VolumeRecord, status int) {
	m.mu.Lock()
	info := m.volumeInfo(ld, v, time.Now())
	m.mu.Unlock()
	writeJSON(w, status, info)
}
