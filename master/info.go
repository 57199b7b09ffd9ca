package master

import (
	"sort"
	"time"

	"github.com/blockd/blockd/api"
)

// ---- read side ----

func (m *Master) primaryAlive(ld *leaderState, v *VolumeRecord, now time.Time) (bool, time.Duration) {
	if v.Primary == "" {
		return false, 0
	}
	d := m.leaseDeadline(ld, v.Primary).Sub(now)
	return d > 0, max(d, 0)
}

// volumeInfo renders v with the leader's live knowledge. Caller holds m.mu.
func (m *Master) volumeInfo(ld *leaderState, v *VolumeRecord, now time.Time) api.VolumeInfo {
	info := api.VolumeInfo{Name: v.Name, ID: v.ID, SizeBytes: v.SizeBytes, BlockSize: v.BlockSize, Epoch: v.Epoch,
		Durability: v.Durability, RF: v.RF, Preset: v.Preset, WALSizeBytes: v.WALSizeBytes, Replicas: []api.ReplicaInfo{},
		MinCopies: v.EffectiveMinCopies(), ActingSet: append([]string{}, v.ActingSet...), Stale: v.Stale(), Allow: cloneAllow(v.Allow)}
	if v.Primary != "" {
		info.ActingSet = append([]string{v.Primary}, v.ActingSet...)
	}
	pr := m.serverRef(v.Primary)
	info.Primary = api.PrimaryRef{ServerID: pr.ServerID, NBDAddr: pr.NBDAddr, Addr: pr.Addr, HTTPAddr: pr.HTTPAddr}
	var primaryRep *api.HeartbeatVolume
	fresh := false
	if ls := ld.servers[v.Primary]; ls != nil {
		fresh = now.Sub(ls.heard) <= m.cfg.freshWindow()
		if r, ok := ls.reports[v.Name]; ok && r.Epoch == v.Epoch && r.Role == api.RolePrimary {
			primaryRep = &r
			info.HeadLSN = r.HeadLSN
		}
	}
	allInSync := true
	states := map[string]string{}
	for _, id := range v.Replicas {
		ref := m.serverRef(id)
		ri := api.ReplicaInfo{ServerID: id, Addr: ref.Addr, State: api.StateDisconnected, InActingSet: v.inActing(id)}
		ri.Stale = !ri.InActingSet
		found := false
		if primaryRep != nil {
			for _, pr := range primaryRep.Replicas {
				if pr.ServerID == id {
					ri.State, ri.FlushedLSN, found = pr.State, pr.FlushedLSN, true
					ri.Progress = pr.Progress
				}
			}
		}
		if !found {
			if ls := ld.servers[id]; ls != nil {
				if r, ok := ls.reports[v.Name]; ok {
					ri.FlushedLSN = r.DurableLSN
				}
			}
		}
		if ri.State != api.StateInSync {
			allInSync = false
		}
		states[id] = ri.State
		info.Replicas = append(info.Replicas, ri)
	}
	info.Expand, info.MemberSizes = expandStatus(ld, v), memberSizes(ld, v)
	info.FlushesOK, info.FlushBlocker = FlushGate(v.Durability, v.RF, v.EffectiveMinCopies(), v.ActingSet, states, primaryRep != nil && fresh)
	switch p := ld.pending[v.Name]; {
	case v.Failure != nil:
		info.Status = api.StatusFailed
		info.Failure = v.Failure.Server + ": " + v.Failure.Reason
		info.FlushesOK, info.FlushBlocker = false, "failed: "+info.Failure
	case p != nil && p.expired:
		info.Status = api.StatusUnavailable
	case p != nil:
		info.Status = api.StatusFailingOver
	case primaryRep == nil || !fresh:
		info.Status = api.StatusPending
	case allInSync && len(info.Stale) == 0:
		info.Status = api.StatusHealthy
	default:
		info.Status = api.StatusDegraded
	}
	return info
}

// serverStates feeds placement. Caller holds m.mu.
func (m *Master) serverStates(ld *leaderState, now time.Time) []ServerState {
	vols := m.fsm.volumes()
	count, prim := map[string]int{}, map[string]int{}
	prov := map[string]int64{}
	for _, v := range vols {
		prim[v.Primary]++
		for _, id := range v.Members() {
			count[id]++
			prov[id] += v.SizeBytes + v.WALSizeBytes
		}
	}
	var out []ServerState
	for _, s := range m.fsm.servers() {
		st := ServerState{ID: s.ID, Volumes: count[s.ID], Primaries: prim[s.ID], ProvisionedBytes: prov[s.ID]}
		if ls := ld.servers[s.ID]; ls != nil {
			st.Alive = now.Sub(ls.heard) <= m.cfg.freshWindow()
			st.CapacityBytes, st.FreeBytes = ls.capacity, ls.free
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}
