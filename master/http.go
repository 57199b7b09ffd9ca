package master

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/blockd/blockd/api"
)

const maxBody = 1 << 20

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeErr(w http.ResponseWriter, e *api.Error) {
	st := e.Status
	if st == 0 {
		st = api.StatusFor(e.Code)
	}
	writeJSON(w, st, e)
}

func decode(r *http.Request, v any) *api.Error {
	data, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return api.Errorf(api.CodeBadRequest, "read body: %v", err)
	}
	if len(data) > maxBody {
		return api.Errorf(api.CodeBadRequest, "body larger than %d bytes", maxBody)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return api.Errorf(api.CodeBadRequest, "invalid JSON: %v", err)
	}
	return nil
}

func remoteIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return ""
	}
	return host
}

type leaderHandler func(w http.ResponseWriter, r *http.Request, ld *leaderState)

// lead runs h on the ready leader; elsewhere it redirects (307) to the
// leader or answers 503 not_leader.
func (m *Master) lead(h leaderHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ld := m.leader()
		if ld == nil {
			e := notLeader(m)
			if e.Leader != "" && e.Leader != m.id {
				e.Status = http.StatusTemporaryRedirect
				e.Message = "not the leader; redirecting to " + e.Leader
				w.Header().Set("Location", "http://"+e.Leader+r.URL.RequestURI())
			}
			writeErr(w, e)
			return
		}
		h(w, r, ld)
	}
}

func (m *Master) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", m.hStatus)
	mux.Handle("GET /metrics", m.met.handler())
	mux.HandleFunc("POST /v1/raft/join", m.lead(m.hJoin))
	mux.HandleFunc("POST /v1/raft/remove", m.lead(m.hRemove))
	mux.HandleFunc("POST /v1/heartbeat", m.lead(m.hHeartbeat))
	mux.HandleFunc("GET /v1/servers", m.lead(m.hServers))
	mux.HandleFunc("GET /v1/volumes", m.lead(m.hList))
	mux.HandleFunc("POST /v1/volumes", m.lead(m.hCreate))
	mux.HandleFunc("POST /v1/volumes/plan", m.lead(m.hPlan))
	mux.HandleFunc("POST /v1/volumes/resolve", m.lead(m.hResolve))
	mux.HandleFunc("GET /v1/volumes/{name}", m.lead(m.hInfo))
	mux.HandleFunc("DELETE /v1/volumes/{name}", m.lead(m.hDelete))
	mux.HandleFunc("POST /v1/volumes/{name}/expand", m.lead(m.hExpand))
	mux.HandleFunc("POST /v1/volumes/{name}/update", m.lead(m.hUpdate))
	mux.HandleFunc("GET /v1/volumes/{name}/primary", m.lead(m.hPrimary))
	mux.HandleFunc("GET /v1/volumes/{name}/preflight", m.lead(m.hPreflight))
	mux.HandleFunc("POST /v1/volumes/{name}/promote", m.lead(m.hPromote))
	mux.Handle("/v1/server/", &m.mounted)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, api.Errorf(api.CodeNotFound, "no such endpoint: %s %s", r.Method, r.URL.Path))
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				m.log.Error("api_panic", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(p))
				writeErr(w, api.Errorf(api.CodeInternal, "internal error"))
			}
		}()
		mux.ServeHTTP(w, r)
	})
}

func (m *Master) hStatus(w http.ResponseWriter, r *http.Request) {
	st := api.StatusResponse{ID: m.id, State: m.raft.State().String(), IsLeader: m.IsLeader(), Leader: m.leaderAPI(), Peers: []string{}}
	if f := m.raft.GetConfiguration(); f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			st.Peers = append(st.Peers, string(s.ID))
		}
	}
	st.Term = m.raft.CurrentTerm()
	st.Applied = m.raft.AppliedIndex()
	writeJSON(w, http.StatusOK, st)
}

// hJoin adds a master: refused on a clash or an unreachable raft address,
// else a non-voter promoted once caught up (membership.go).
func (m *Master) hJoin(w http.ResponseWriter, r *http.Request, _ *leaderState) {
	var req api.JoinRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	resp, e := m.joinMember(req)
	if e != nil {
		writeErr(w, e)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// hRemove removes a (dead) master from the raft configuration.
func (m *Master) hRemove(w http.ResponseWriter, r *http.Request, _ *leaderState) {
	var req api.RemoveRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	resp, e := m.removeMember(req)
	if e != nil {
		writeErr(w, e)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

func (m *Master) hHeartbeat(w http.ResponseWriter, r *http.Request, _ *leaderState) {
	var req api.HeartbeatRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	resp, e := m.Heartbeat(req, remoteIP(r))
	if e != nil {
		writeErr(w, e)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

func (m *Master) hServers(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	now := time.Now()
	m.mu.Lock()
	states := m.serverStates(ld, now)
	out := make([]api.ServerInfo, 0, len(states))
	for _, s := range states {
		rec := m.fsm.server(s.ID)
		si := api.ServerInfo{ServerID: s.ID, Addr: rec.Addr, NBDAddr: rec.NBDAddr, CapacityBytes: s.CapacityBytes,
			FreeBytes: s.FreeBytes, Alive: s.Alive, Volumes: s.Volumes, LastHeartbeatMS: -1}
		if ls := ld.servers[s.ID]; ls != nil {
			si.LastHeartbeatMS = now.Sub(ls.heard).Milliseconds()
		}
		out = append(out, si)
	}
	m.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

func (m *Master) hList(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	now := time.Now()
	vols := m.fsm.volumes()
	out := make([]api.VolumeInfo, 0, len(vols))
	m.mu.Lock()
	for _, v := range vols {
		out = append(out, m.volumeInfo(ld, v, now))
	}
	m.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

func (m *Master) lookup(w http.ResponseWriter, r *http.Request) *VolumeRecord {
	name := r.PathValue("name")
	v := m.fsm.volume(name)
	if v == nil {
		writeErr(w, api.Errorf(api.CodeNotFound, "volume %s not found", api.QuoteName(name)))
	}
	return v
}

func (m *Master) hInfo(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	v := m.lookup(w, r)
	if v == nil {
		return
	}
	m.mu.Lock()
	info := m.volumeInfo(ld, v, time.Now())
	m.mu.Unlock()
	writeJSON(w, http.StatusOK, info)
}

func (m *Master) hPrimary(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	v := m.lookup(w, r)
	if v == nil {
		return
	}
	if v.Primary == "" {
		writeErr(w, api.Errorf(api.CodeNoPrimary, "volume %q has no primary", v.Name))
		return
	}
	ref := m.serverRef(v.Primary)
	writeJSON(w, http.StatusOK, api.PrimaryInfo{Volume: v.Name, Epoch: v.Epoch, ServerID: ref.ServerID, Addr: ref.Addr, NBDAddr: ref.NBDAddr, HTTPAddr: ref.HTTPAddr})
}

// plan resolves and places a create request (shared by plan and create).
func (m *Master) plan(ld *leaderState, req api.CreateVolumeRequest) api.PlanResponse {
	m.mu.Lock()
	states := m.serverStates(ld, time.Now())
	m.mu.Unlock()
	res := Resolve(req, len(states))
	out := api.PlanResponse{Policy: res.Policy, Warnings: res.Warnings, Errors: res.Errors, Replicas: []string{}}
	if len(res.Errors) > 0 {
		for _, s := range states {
			out.Candidates = append(out.Candidates, api.PlacementCandidate{ServerID: s.ID, FreeBytes: s.FreeBytes, VolumeCount: s.Volumes})
		}
		return out
	}
	pl := PlaceWith(Policy{OverprovisionPercent: m.cfg.OverprovisionPercent}, states, res.Policy.RF, res.Policy.SizeBytes, res.Policy.WALSizeBytes)
	out.Candidates = pl.Candidates
	if pl.Err != nil {
		e := *pl.Err
		e.Placement = nil // the plan's candidates carry them
		out.Errors = append(out.Errors, e)
		return out
	}
	out.Primary, out.Replicas = pl.Primary, pl.Replicas
	return out
}

func (m *Master) hPlan(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	var req api.CreateVolumeRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	writeJSON(w, http.StatusOK, m.plan(ld, req))
}

func (m *Master) hResolve(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	var req api.CreateVolumeRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	writeJSON(w, http.StatusOK, Resolve(req, len(m.fsm.servers())))
}

func (m *Master) hCreate(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	var req api.CreateVolumeRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	info, e := m.create(ld, req)
	if e != nil {
		writeErr(w, e)
		return
	}
	writeJSON(w, http.StatusCreated, info)
}

func (m *Master) create(ld *leaderState, req api.CreateVolumeRequest) (*api.VolumeInfo, *api.Error) {
	if e := ValidateName(req.Name); e != nil {
		return nil, e
	}
	if err := api.ValidateAllow(req.Allow); err != nil {
		return nil, api.Errorf(api.CodeBadRequest, "%v", err)
	}
	render := func(v *VolumeRecord) *api.VolumeInfo {
		m.mu.Lock()
		defer m.mu.Unlock()
		i := m.volumeInfo(ld, v, time.Now())
		return &i
	}
	if old := m.fsm.volume(req.Name); old != nil {
		if req.RequestID != "" && old.RequestID == req.RequestID {
			return render(old), nil // retry of a create that already committed
		}
		return nil, api.Errorf(api.CodeAlreadyExists, "volume %s already exists", api.QuoteName(req.Name))
	}
	pl := m.plan(ld, req)
	if len(pl.Errors) > 0 && pl.Errors[0].Code == api.CodeInsufficientServers && mayWarm(pl.Candidates) {
		// A new leader knows no server alive until they heartbeat to it:
		// give them one freshness window before refusing.
		// Re-plan as they arrive: a placement that succeeds, or that every
		// server heard from refuses for its own reason, answers at once.
		warm := ld.since.Add(m.cfg.freshWindow())
		for time.Now().Before(warm) && len(pl.Errors) > 0 && pl.Errors[0].Code == api.CodeInsufficientServers && mayWarm(pl.Candidates) {
			time.Sleep(min(50*time.Millisecond, time.Until(warm)))
			pl = m.plan(ld, req)
		}
	}
	if len(pl.Errors) > 0 {
		e := pl.Errors[0]
		e.Status = api.StatusFor(e.Code)
		if e.Code == api.CodeInsufficientServers {
			e.Placement = pl.Candidates
		}
		m.log.Info("volume_create_rejected", "volume", req.Name, "code", e.Code, "reason", e.Message)
		return nil, &e
	}
	p := pl.Policy
	rec := &VolumeRecord{Name: req.Name, SizeBytes: p.SizeBytes, BlockSize: p.BlockSize, RF: p.RF, Durability: p.Durability,
		Preset: p.Preset, WALSizeBytes: p.WALSizeBytes, Epoch: 1, Primary: pl.Primary, Replicas: pl.Replicas, RequestID: req.RequestID,
		ActingSet: append([]string{}, pl.Replicas...), MinCopies: p.MinCopies, Allow: cloneAllow(req.Allow)}
	res := m.apply(command{Op: opCreate, Volume: rec})
	if res.Err != nil {
		return nil, res.Err
	}
	m.log.Info("volume_created", "volume", rec.Name, "id", res.Vol.ID, "size", p.SizeBytes, "rf", p.RF, "durability", p.Durability,
		"preset", p.Preset, "primary", res.Vol.Primary, "replicas", res.Vol.Replicas, "epoch", res.Vol.Epoch,
		"acting_set", res.Vol.ActingSet, "min_copies", res.Vol.EffectiveMinCopies())
	for _, wn := range pl.Warnings {
		m.log.Info("volume_create_warning", "volume", rec.Name, "code", wn.Code, "message", wn.Message)
	}
	return render(res.Vol), nil
}

// mayWarm: a refused placement could change once servers heartbeat to a
// new leader (some server is not alive, or none is known). A refusal for
// capacity alone is final at once.
func mayWarm(cands []api.PlacementCandidate) bool {
	if len(cands) == 0 {
		return true
	}
	for _, c := range cands {
		if c.Rejection == RejectNotAlive {
			return true
		}
	}
	return false
}

func (m *Master) hDelete(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	name := r.PathValue("name")
	res := m.apply(command{Op: opDelete, Name: name})
	if res.Err != nil {
		writeErr(w, res.Err)
		return
	}
	m.mu.Lock()
	if p := ld.pending[name]; p != nil && p.timer != nil {
		p.timer.Stop()
	}
	delete(ld.pending, name)
	delete(ld.leaseNotBefore, name)
	delete(ld.tracks, name)
	m.mu.Unlock()
	m.log.Info("volume_deleted", "volume", name, "id", res.Vol.ID)
	w.WriteHeader(http.StatusNoContent)
}

func (m *Master) hUpdate(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	var req api.UpdateVolumeRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	v := m.lookup(w, r)
	if v == nil {
		return
	}
	nv, e := m.updatePolicy(v, req)
	if e == nil {
		nv, e = m.updateAllow(nv, req)
	}
	if e != nil {
		m.log.Info("volume_update_rejected", "volume", v.Name, "reason", e.Message)
		writeErr(w, e)
		return
	}
	m.mu.Lock()
	info := m.volumeInfo(ld, nv, time.Now())
	m.mu.Unlock()
	writeJSON(w, http.StatusOK, info)
}

func (m *Master) preflight(ld *leaderState, v *VolumeRecord) (api.PreflightResponse, []api.Candidate, string, bool) {
	now := time.Now()
	m.mu.Lock()
	in, head := m.candidateInputs(ld, v, now)
	alive, left := m.primaryAlive(ld, v, now)
	m.mu.Unlock()
	cands, best := EvaluateCandidates(v.ID, v.Epoch, head, in, m.gates())
	if ok, _, _ := m.failoverQuorum(v, cands); !ok && best != "" {
		best = "" // the best acting member may lack acknowledged writes: only --force
	}
	out := api.PreflightResponse{Volume: v.Name, Epoch: v.Epoch, Primary: v.Primary, PrimaryAlive: alive,
		LeaseExpiresMS: left.Milliseconds(), Best: best, Candidates: cands, Blockers: []string{}}
	if alive {
		out.Blockers = append(out.Blockers, api.ReasonPrimaryAlive)
	}
	if ok, _, _ := m.failoverQuorum(v, cands); !ok {
		out.Blockers = append(out.Blockers, BlockerQuorumLost)
	}
	return out, cands, best, alive
}

func (m *Master) hPreflight(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	v := m.lookup(w, r)
	if v == nil {
		return
	}
	out, _, _, _ := m.preflight(ld, v)
	writeJSON(w, http.StatusOK, out)
}

func (m *Master) hPromote(w http.ResponseWriter, r *http.Request, ld *leaderState) {
	var req api.PromoteRequest
	if e := decode(r, &req); e != nil {
		writeErr(w, e)
		return
	}
	v := m.lookup(w, r)
	if v == nil {
		return
	}
	if req.Epoch != 0 && req.Epoch != v.Epoch {
		writeErr(w, api.Errorf(api.CodeEpochChanged, "volume %q is at epoch %d, not %d", v.Name, v.Epoch, req.Epoch))
		return
	}
	_, cands, best, alive := m.preflight(ld, v)
	target, bypassed, e := PromoteDecision(cands, best, v.Primary, req.Target, req.Force, alive)
	if e != nil {
		m.log.Info("promote_rejected", "volume", v.Name, "target", req.Target, "force", req.Force, "epoch", v.Epoch, "reason", e.Message)
		writeErr(w, e)
		return
	}
	res, fence := m.reassign(ld, v, target)
	if res.Err != nil {
		writeErr(w, res.Err)
		return
	}
	now := time.Now()
	m.mu.Lock()
	if p := ld.pending[v.Name]; p != nil {
		if p.timer != nil {
			p.timer.Stop()
		}
		delete(ld.pending, v.Name)
	}
	m.mu.Unlock()
	wait := max(fence.Sub(now), 0)
	if contains(bypassed, api.ReasonStale) {
		m.log.Warn("stale_replica_promoted", "volume", v.Name, "new_primary", target, "epoch", res.Vol.Epoch,
			"acting_set", v.ActingSet, "risk", "it was outside the acting set: acknowledged writes may be lost")
	}
	m.met.promoted(promoteManual)
	m.log.Info("promotion", "volume", v.Name, "reason", "manual", "old_primary", v.Primary, "new_primary", target,
		"epoch", res.Vol.Epoch, "force", req.Force, "bypassed", bypassed, "lease_wait_ms", wait.Milliseconds())
	writeJSON(w, http.StatusOK, api.PromoteResponse{Volume: v.Name, OldPrimary: v.Primary, NewPrimary: target,
		Epoch: res.Vol.Epoch, Bypassed: bypassed, LeaseWaitMS: wait.Milliseconds()})
}
