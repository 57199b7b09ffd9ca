package master

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/raft"

	"github.com/blockd/blockd/api"
)

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }

// liveServer is the leader's memory of one server's heartbeats.
type liveServer struct {
	heard    time.Time // when the leader last answered its heartbeat
	capacity int64
	free     int64
	reports  map[string]api.HeartbeatVolume
}

// pendingFailover is a deferred failover of one volume: armed when its
// primary's heartbeats stop, it fires when the primary's lease has surely
// expired. It is bound to the volume's incarnation and epoch; a heartbeat
// from the primary cancels it.
type pendingFailover struct {
	name     string
	id       uint64
	epoch    uint64
	primary  string
	lastSeen time.Time
	expiry   time.Time
	timer    *time.Timer
	expired  bool // the lease wait is over; retried by the sweep until a candidate appears
	running  bool
	noCand   bool // failover_no_candidate was logged
}

// leaderState is what only the current leader holds, rebuilt on election.
type leaderState struct {
	since          time.Time
	servers        map[string]*liveServer
	pending        map[string]*pendingFailover
	leaseNotBefore map[string]time.Time // volume -> no primary lease before this
	sent           map[string]string    // volume/server -> role@epoch last logged as sent
	confirmed      map[string]string    // volume/server -> role@epoch last logged as confirmed
	unknownLogged  map[string]bool
	tracks         map[string]*VolumeTrack // volume -> the primary's reports at the current epoch
	sentAt         map[string]time.Time    // volume/server -> when the current unconfirmed role@epoch was first sent
}

func newLeaderState(now time.Time) *leaderState {
	return &leaderState{since: now, servers: map[string]*liveServer{}, pending: map[string]*pendingFailover{},
		leaseNotBefore: map[string]time.Time{}, sent: map[string]string{}, confirmed: map[string]string{}, unknownLogged: map[string]bool{},
		tracks: map[string]*VolumeTrack{}, sentAt: map[string]time.Time{}}
}

func (ld *leaderState) stopTimers() {
	for _, p := range ld.pending {
		if p.timer != nil {
			p.timer.Stop()
		}
	}
}

// lastSeen is the last time the leader may have granted id a lease: its
// last answered heartbeat, or the leader's start (a previous leader may
// have granted one until then).
func (ld *leaderState) lastSeen(id string) time.Time {
	t := ld.since
	if ls := ld.servers[id]; ls != nil && ls.heard.After(t) {
		t = ls.heard
	}
	return t
}

func (m *Master) leaseDeadline(ld *leaderState, id string) time.Time {
	return ld.lastSeen(id).Add(m.cfg.LeaseTTL + m.cfg.LeaseMargin)
}

func (m *Master) leader() *leaderState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ld
}

func notLeader(m *Master) *api.Error {
	return &api.Error{Code: api.CodeNotLeader, Message: "this master is not the leader", Leader: m.leaderAPI(), Status: 503}
}

// canonicalAddr fills an empty or wildcard host with the caller's IP (a
// server bound to ":port" must not be advertised as ":port").
func canonicalAddr(addr, remoteIP string) string {
	if addr == "" || remoteIP == "" {
		return addr
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return net.JoinHostPort(remoteIP, port)
	}
	return addr
}

// Heartbeat processes one server heartbeat (the leader only).
func (m *Master) Heartbeat(req api.HeartbeatRequest, remoteIP string) (*api.HeartbeatResponse, *api.Error) {
	if req.ServerID == "" {
		return nil, api.Errorf(api.CodeBadRequest, "heartbeat without server_id")
	}
	if req.Addr == "" {
		return nil, api.Errorf(api.CodeBadRequest, "heartbeat from %s without addr", req.ServerID)
	}
	req.Addr = canonicalAddr(req.Addr, remoteIP)
	req.NBDAddr = canonicalAddr(req.NBDAddr, remoteIP)
	if req.HTTPAddr != "" {
		req.HTTPAddr = canonicalAddr(req.HTTPAddr, remoteIP)
	}
	ld := m.leader()
	if ld == nil {
		return nil, notLeader(m)
	}
	// A heartbeat proves nothing about who sent it (no TLS): an endpoint
	// change for a known ID, or a new ID taking a live server's endpoint,
	// takes effect only once the old endpoint's owner has been silent for
	// a lease TTL. Until then the heartbeat is refused and changes nothing.
	if e := m.checkEndpointChange(ld, req); e != nil {
		return nil, e
	}
	// Identity and endpoints are raft state: record a new server or an
	// address change (the ID stays; the endpoint follows).
	if rec := m.fsm.server(req.ServerID); rec == nil || rec.Addr != req.Addr || rec.NBDAddr != req.NBDAddr || rec.HTTPAddr != req.HTTPAddr {
		res := m.apply(command{Op: opUpsertServer, Server: &ServerRecord{ID: req.ServerID, Addr: req.Addr, NBDAddr: req.NBDAddr, HTTPAddr: req.HTTPAddr}})
		if res.Err != nil {
			return nil, res.Err
		}
		// Address reuse: another server's record pointing at this endpoint
		// is stale; clear it so nothing is sent to the wrong server (an
		// identity is the server ID, never the address).
		for _, o := range m.fsm.servers() {
			if o.ID == req.ServerID || (o.Addr != req.Addr && o.NBDAddr != req.NBDAddr) {
				continue
			}
			cleared := o
			if o.Addr == req.Addr {
				cleared.Addr = ""
			}
			if o.NBDAddr == req.NBDAddr {
				cleared.NBDAddr = ""
			}
			if r := m.apply(command{Op: opUpsertServer, Server: &cleared}); r.Err != nil {
				return nil, r.Err
			}
			m.log.Warn("address_reused", "server", req.ServerID, "previous_owner", o.ID, "addr", req.Addr, "nbd_addr", req.NBDAddr)
		}
		if rec == nil {
			m.log.Info("server_registered", "server", req.ServerID, "addr", req.Addr, "nbd_addr", req.NBDAddr, "http_addr", req.HTTPAddr)
		} else {
			m.log.Info("server_address_changed", "server", req.ServerID, "old_addr", rec.Addr, "addr", req.Addr, "nbd_addr", req.NBDAddr, "http_addr", req.HTTPAddr)
		}
	}

	now := time.Now()
	reports := make(map[string]api.HeartbeatVolume, len(req.Volumes))
	for _, v := range req.Volumes {
		reports[v.Name] = v
	}
	if e := m.recordFailures(req, reports); e != nil {
		return nil, e
	}
	m.mu.Lock()
	if m.ld != ld || m.raft.State() != raft.Leader {
		m.mu.Unlock()
		return nil, notLeader(m)
	}
	// Record the answer time BEFORE reading the registry: a promotion that
	// commits after this point sees it when it computes the lease fence.
	ls := ld.servers[req.ServerID]
	if ls == nil {
		ls = &liveServer{}
		ld.servers[req.ServerID] = ls
	}
	ls.heard, ls.capacity, ls.free, ls.reports = now, req.CapacityBytes, req.FreeBytes, reports
	for name, p := range ld.pending {
		if p.primary == req.ServerID {
			if p.timer != nil {
				p.timer.Stop()
			}
			delete(ld.pending, name)
			m.log.Info("failover_cancelled", "volume", name, "primary", p.primary, "epoch", p.epoch, "reason", "primary_heartbeat_returned")
		}
	}
	m.mu.Unlock()

	resp := &api.HeartbeatResponse{
		LeaseTTLMS:          m.cfg.LeaseTTL.Milliseconds(),
		HeartbeatIntervalMS: m.cfg.HeartbeatInterval.Milliseconds(),
		Assignments:         []api.VolumeAssignment{},
		Drop:                []string{},
	}
	vols := m.fsm.volumes()
	known := map[string]*VolumeRecord{}
	fast := false // something is changing for this server: ask it to heartbeat sooner
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range vols {
		known[v.Name] = v
		if !v.has(req.ServerID) {
			continue
		}
		if r, ok := reports[v.Name]; ok && v.Primary == req.ServerID {
			ld.tracks[v.Name] = TrackReport(ld.tracks[v.Name], v.ID, v.Epoch, r, now)
		}
		a := m.assignment(v, req.ServerID)
		if a.Role == api.RolePrimary {
			if nb, ok := ld.leaseNotBefore[v.Name]; ok && now.Before(nb) {
				a.LeaseTTLMS = 0
				if wk := fmt.Sprintf("withheld/%s/%s@%d", v.Name, req.ServerID, v.Epoch); !ld.unknownLogged[wk] {
					ld.unknownLogged[wk] = true
					m.log.Info("lease_withheld", "volume", v.Name, "server", req.ServerID, "epoch", v.Epoch, "wait_ms", nb.Sub(now).Milliseconds())
				}
			} else {
				a.LeaseTTLMS = m.cfg.LeaseTTL.Milliseconds()
			}
		}
		key := v.Name + "/" + req.ServerID
		want := fmt.Sprintf("%s@%d", a.Role, a.Epoch)
		if r, ok := reports[v.Name]; ok && r.Role == a.Role && r.Epoch == a.Epoch {
			a.Confirmed = true
			if ld.confirmed[key] != want {
				ld.confirmed[key] = want
				m.log.Info("assignment_confirmed", "volume", v.Name, "server", req.ServerID, "role", a.Role, "epoch", a.Epoch)
			}
		} else if ld.sent[key] != want {
			ld.sent[key] = want
			ld.sentAt[key] = now
			m.log.Info("assignment_sent", "volume", v.Name, "server", req.ServerID, "role", a.Role, "epoch", a.Epoch,
				"reported_role", r.Role, "reported_epoch", r.Epoch)
		}
		if r, ok := reports[v.Name]; ok && r.Epoch > v.Epoch {
			m.log.Warn("epoch_ahead_of_registry", "volume", v.Name, "server", req.ServerID, "reported_epoch", r.Epoch, "epoch", v.Epoch)
		} else if ok && r.Role == api.RolePrimary && r.Epoch == v.Epoch && v.Primary != req.ServerID && !ld.unknownLogged["conflict/"+key] {
			ld.unknownLogged["conflict/"+key] = true // the registry wins: it is told to be a replica
			m.log.Warn("role_conflict", "volume", v.Name, "server", req.ServerID, "reported_role", r.Role, "epoch", v.Epoch, "primary", v.Primary)
		}
		switch {
		case v.Failure != nil:
		case !a.Confirmed && now.Sub(ld.sentAt[key]) < fastWindow:
			fast = true // a new role or epoch: confirm it quickly
		case a.Role == api.RolePrimary && a.LeaseTTLMS == 0:
			fast = true // the lease is withheld: pick it up as soon as the fence passes
		case ld.pending[v.Name] != nil:
			fast = true // a failover may come: learn of it quickly
		case v.preparing() != nil:
			fast = true // an expand waits for this member's prepared report
		}
		resp.Assignments = append(resp.Assignments, a)
	}
	if fast {
		resp.HeartbeatIntervalMS = m.fastHeartbeat().Milliseconds()
	}
	// Reported volumes this server should not have.
	for _, r := range req.Volumes {
		v := known[r.Name]
		switch {
		case v != nil && r.ID != 0 && r.ID != v.ID:
			resp.Drop = append(resp.Drop, r.Name)
			m.log.Info("volume_drop", "volume", r.Name, "server", req.ServerID, "reason", "old_incarnation", "reported_id", r.ID, "id", v.ID)
		case v != nil && !v.has(req.ServerID):
			resp.Assignments = append(resp.Assignments, api.VolumeAssignment{Volume: v.Name, ID: v.ID, SizeBytes: v.SizeBytes,
				BlockSize: v.BlockSize, WALSizeBytes: v.WALSizeBytes, Durability: v.Durability, Role: api.RoleNone, Epoch: v.Epoch,
				Replicas: []api.ServerRef{}})
		case v == nil:
			if _, dead := m.fsm.tombstone(r.Name); dead {
				resp.Drop = append(resp.Drop, r.Name)
				m.log.Info("volume_drop", "volume", r.Name, "server", req.ServerID, "reason", "deleted")
			} else if !ld.unknownLogged[r.Name+"/"+req.ServerID] {
				ld.unknownLogged[r.Name+"/"+req.ServerID] = true
				m.log.Warn("unknown_volume_reported", "volume", r.Name, "server", req.ServerID, "epoch", r.Epoch, "role", r.Role)
			}
		}
	}
	return resp, nil
}

// assignment is the desired state of v on server id (lease not filled).
func (m *Master) assignment(v *VolumeRecord, id string) api.VolumeAssignment {
	a := api.VolumeAssignment{Volume: v.Name, ID: v.ID, SizeBytes: v.SizeBytes, BlockSize: v.BlockSize,
		WALSizeBytes: v.WALSizeBytes, Durability: v.Durability, Epoch: v.Epoch, Role: api.RoleReplica, Replicas: []api.ServerRef{},
		ActingSet: append([]string{}, v.ActingSet...), MinCopies: v.EffectiveMinCopies(), Allow: cloneAllow(v.Allow)}
	expandAssign(v, &a)
	if v.Primary == id {
		a.Role = api.RolePrimary
	}
	a.Primary = m.serverRef(v.Primary)
	for _, r := range v.Replicas {
		a.Replicas = append(a.Replicas, m.serverRef(r))
	}
	return a
}

func (m *Master) serverRef(id string) api.ServerRef {
	ref := api.ServerRef{ServerID: id}
	if s := m.fsm.server(id); s != nil {
		ref.Addr, ref.NBDAddr, ref.HTTPAddr = s.Addr, s.NBDAddr, s.HTTPAddr
	}
	return ref
}

// suspectAfter: a primary silent this long gets a deferred failover armed.
func (m *Master) suspectAfter() time.Duration { return 2 * m.cfg.HeartbeatInterval }

// sweep arms deferred failovers for silent primaries and retries expired
// ones that found no candidate (a replica may have come back since).
func (m *Master) sweep(now time.Time) {
	vols := m.fsm.volumes()
	var retry []*pendingFailover
	m.mu.Lock()
	ld := m.ld
	if ld == nil {
		m.mu.Unlock()
		return
	}
	live := map[string]bool{}
	for _, v := range vols {
		live[v.Name] = true
		p := ld.pending[v.Name]
		if p != nil && (p.id != v.ID || p.epoch != v.Epoch || p.primary != v.Primary) {
			if p.timer != nil {
				p.timer.Stop()
			}
			delete(ld.pending, v.Name)
			m.log.Info("failover_timer_stale", "volume", v.Name, "armed_epoch", p.epoch, "epoch", v.Epoch)
			p = nil
		}
		if v.Primary == "" {
			continue
		}
		last := ld.lastSeen(v.Primary)
		if now.Sub(last) <= m.suspectAfter() {
			continue
		}
		if p == nil {
			p = &pendingFailover{name: v.Name, id: v.ID, epoch: v.Epoch, primary: v.Primary, lastSeen: last,
				expiry: m.leaseDeadline(ld, v.Primary)}
			ld.pending[v.Name] = p
			wait := p.expiry.Sub(now)
			m.log.Info("lease_wait", "volume", v.Name, "primary", v.Primary, "epoch", v.Epoch,
				"silent_ms", now.Sub(last).Milliseconds(), "wait_ms", wait.Milliseconds())
			pf := p
			p.timer = time.AfterFunc(max(wait, 0), func() { m.failoverFire(pf) })
			continue
		}
		if p.expired && !p.running {
			retry = append(retry, p)
		}
	}
	for name, p := range ld.pending {
		if !live[name] {
			if p.timer != nil {
				p.timer.Stop()
			}
			delete(ld.pending, name)
		}
	}
	m.mu.Unlock()
	for _, p := range retry {
		m.tryFailover(p)
	}
}

// failoverFire is the deferred timer: it re-checks everything before acting.
func (m *Master) failoverFire(p *pendingFailover) {
	m.mu.Lock()
	if m.ld == nil || m.ld.pending[p.name] != p {
		m.mu.Unlock()
		return // cancelled, superseded, or leadership lost
	}
	p.expired = true
	m.mu.Unlock()
	m.tryFailover(p)
}

// candidateInputs gathers what the leader knows of v's replicas. Caller holds m.mu.
func (m *Master) candidateInputs(ld *leaderState, v *VolumeRecord, now time.Time) ([]CandidateInput, uint64) {
	var primaryRep *api.HeartbeatVolume
	if ls := ld.servers[v.Primary]; ls != nil {
		if r, ok := ls.reports[v.Name]; ok && r.Epoch == v.Epoch && r.Role == api.RolePrimary {
			primaryRep = &r
		}
	}
	var head uint64
	if primaryRep != nil {
		head = primaryRep.HeadLSN
	}
	var in []CandidateInput
	for _, id := range v.Replicas {
		c := CandidateInput{ServerID: id, Registered: m.fsm.server(id) != nil, InActing: v.inActing(id)}
		if ls := ld.servers[id]; ls != nil {
			c.Heard, c.Age = true, now.Sub(ls.heard)
			if r, ok := ls.reports[v.Name]; ok {
				c.Report = &r
			}
		}
		if primaryRep != nil {
			for i := range primaryRep.Replicas {
				if primaryRep.Replicas[i].ServerID == id {
					pv := primaryRep.Replicas[i]
					c.PrimaryView = &pv
				}
			}
		}
		in = append(in, c)
	}
	return in, head
}

func (m *Master) gates() Gates { return Gates{FreshWindow: m.cfg.freshWindow(), MaxLag: m.cfg.MaxLag} }

// tryFailover promotes the best candidate of p's volume if everything still holds.
func (m *Master) tryFailover(p *pendingFailover) {
	v := m.fsm.volume(p.name)
	now := time.Now()
	m.mu.Lock()
	ld := m.ld
	if ld == nil || ld.pending[p.name] != p || p.running {
		m.mu.Unlock()
		return
	}
	if v == nil || v.ID != p.id || v.Epoch != p.epoch || v.Primary != p.primary {
		delete(ld.pending, p.name)
		m.mu.Unlock()
		m.log.Info("failover_timer_stale", "volume", p.name, "armed_epoch", p.epoch)
		return
	}
	if ld.lastSeen(p.primary).After(p.lastSeen) {
		delete(ld.pending, p.name) // the primary spoke since: not lost after all
		m.mu.Unlock()
		m.log.Info("failover_cancelled", "volume", p.name, "primary", p.primary, "epoch", p.epoch, "reason", "primary_seen_again")
		return
	}
	if now.Before(m.leaseDeadline(ld, p.primary)) {
		m.mu.Unlock() // its lease may still be live: never promote before it surely expired
		return
	}
	in, head := m.candidateInputs(ld, v, now)
	p.running = true
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		p.running = false
		m.mu.Unlock()
	}()

	cands, best := EvaluateCandidates(v.ID, v.Epoch, head, in, m.gates())
	quorumOK, need, eligible := m.failoverQuorum(v, cands)
	if best == "" || !quorumOK {
		m.mu.Lock()
		first := !p.noCand
		p.noCand = true
		m.mu.Unlock()
		if first {
			m.log.Warn("failover_no_candidate", "volume", v.Name, "primary", v.Primary, "epoch", v.Epoch, "candidates", summarize(cands),
				"acting_set", v.ActingSet, "eligible_acting", eligible, "needed_acting", need)
		}
		return
	}
	var lsn uint64
	for _, c := range cands {
		if c.ServerID == best {
			lsn = c.FlushedLSN
		}
	}
	m.log.Info("failover_candidate_chosen", "volume", v.Name, "old_primary", v.Primary, "candidate", best,
		"flushed_lsn", lsn, "primary_head_lsn", head, "epoch", v.Epoch, "candidates", summarize(cands))
	res, fence := m.reassign(ld, v, best)
	m.mu.Lock()
	if m.ld == ld && ld.pending[p.name] == p {
		delete(ld.pending, p.name)
	}
	m.mu.Unlock()
	if res.Err != nil {
		m.log.Warn("failover_apply_failed", "volume", v.Name, "candidate", best, "epoch", v.Epoch, "err", res.Err)
		return
	}
	m.met.promoted(promoteAuto)
	m.log.Info("promotion", "volume", v.Name, "reason", "failover", "old_primary", v.Primary, "new_primary", best,
		"epoch", res.Vol.Epoch, "flushed_lsn", lsn, "lease_wait_ms", max(time.Until(fence), 0).Milliseconds())
}

// reassign makes newPrimary the primary of v at epoch+1 (raft
// compare-and-set on incarnation and epoch) and fences its lease: no lease
// before the old primary's surely expired. The fence is kept in leader
// memory (exact: computed after the commit, so it covers a heartbeat that
// raced with it) and in the registry as wall-clock time for a next leader.
func (m *Master) reassign(ld *leaderState, v *VolumeRecord, newPrimary string) (*applyResult, time.Time) {
	now := time.Now()
	m.mu.Lock()
	fence := m.leaseDeadline(ld, v.Primary)
	if ls := ld.servers[v.Primary]; ls != nil && now.Sub(ls.heard) <= m.cfg.freshWindow() {
		// Alive: it may be renewed until the commit.
		fence = now.Add(m.cfg.LeaseTTL + m.cfg.LeaseMargin)
	}
	m.mu.Unlock()
	acting := FailoverActing(v.ActingSet, newPrimary)
	res := m.apply(command{Op: opReassign, Name: v.Name, ID: v.ID, ExpectEpoch: v.Epoch, Primary: newPrimary,
		Replicas: FailoverReplicas(v.Primary, v.Replicas, newPrimary), FenceUnixMS: fence.UnixMilli(), ActingSet: acting})
	if res.Err != nil {
		return res, time.Time{}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if after := m.leaseDeadline(ld, v.Primary); after.After(fence) {
		fence = after
	}
	if m.ld == ld {
		ld.leaseNotBefore[v.Name] = fence
	}
	m.log.Info("acting_set_failover", "volume", v.Name, "epoch", res.Vol.Epoch, "new_primary", newPrimary,
		"acting_set", res.Vol.ActingSet, "stale", res.Vol.Stale(), "member", v.Primary, "reason", ActingReasonFailoverStale)
	return res, fence
}

// EndpointChangeAllowed is the rule for an endpoint claim without proof of
// identity: a known server's registered endpoint (oldAddr, "" = none) may
// be replaced by a different one only when its owner has been silent for
// at least ttl. Pure.
func EndpointChangeAllowed(oldAddr, newAddr string, ownerSilent, ttl time.Duration) bool {
	return oldAddr == "" || oldAddr == newAddr || ownerSilent >= ttl
}

// checkEndpointChange refuses a heartbeat whose endpoints would redirect
// traffic away from a server that is still heartbeating: an address change
// for a known ID, or an address held by another live ID.
func (m *Master) checkEndpointChange(ld *leaderState, req api.HeartbeatRequest) *api.Error {
	now := time.Now()
	silent := func(id string) time.Duration {
		m.mu.Lock()
		defer m.mu.Unlock()
		return now.Sub(ld.lastSeen(id))
	}
	refuse := func(owner, field, old, claimed string, quiet time.Duration) *api.Error {
		m.mu.Lock()
		key := fmt.Sprintf("endpoint/%s/%s/%s", req.ServerID, field, claimed)
		first := !ld.unknownLogged[key]
		ld.unknownLogged[key] = true
		m.mu.Unlock()
		wait := max(m.cfg.LeaseTTL-quiet, 0)
		if first {
			m.log.Warn("endpoint_change_refused", "server", req.ServerID, "owner", owner, "field", field, "registered", old,
				"claimed", claimed, "owner_silent_ms", quiet.Milliseconds(), "wait_ms", wait.Milliseconds())
		}
		return api.Errorf(api.CodeAddressInUse, "heartbeat from %q claims %s %s, but %s is registered there (%s) and heartbeated %dms ago: an endpoint moves only after its owner is silent for the lease TTL %v (retry in %dms)",
			req.ServerID, field, claimed, owner, old, quiet.Milliseconds(), m.cfg.LeaseTTL, wait.Milliseconds())
	}
	if rec := m.fsm.server(req.ServerID); rec != nil {
		q := silent(rec.ID)
		if !EndpointChangeAllowed(rec.Addr, req.Addr, q, m.cfg.LeaseTTL) {
			return refuse(rec.ID, "addr", rec.Addr, req.Addr, q)
		}
		if !EndpointChangeAllowed(rec.NBDAddr, req.NBDAddr, q, m.cfg.LeaseTTL) {
			return refuse(rec.ID, "nbd_addr", rec.NBDAddr, req.NBDAddr, q)
		}
		// The admin API address moves under the same rule (dropping it
		// redirects nothing).
		if req.HTTPAddr != "" && !EndpointChangeAllowed(rec.HTTPAddr, req.HTTPAddr, q, m.cfg.LeaseTTL) {
			return refuse(rec.ID, "http_addr", rec.HTTPAddr, req.HTTPAddr, q)
		}
	}
	for _, o := range m.fsm.servers() {
		if o.ID == req.ServerID {
			continue
		}
		for _, f := range []struct{ name, have, want string }{{"addr", o.Addr, req.Addr}, {"nbd_addr", o.NBDAddr, req.NBDAddr}, {"http_addr", o.HTTPAddr, req.HTTPAddr}} {
			if f.have != "" && f.have == f.want {
				if q := silent(o.ID); q < m.cfg.LeaseTTL {
					return refuse(o.ID, f.name, f.have, f.want, q)
				}
			}
		}
	}
	return nil
}

// maxFailureReason bounds a reported failure reason kept in the registry.
const maxFailureReason = 512

// recordFailures marks volumes failed that this server reports it cannot
// create or open, and clears a failure it reported earlier once it hosts
// the volume after all. Only failures of the volume's current incarnation
// and from one of its servers count.
func (m *Master) recordFailures(req api.HeartbeatRequest, reports map[string]api.HeartbeatVolume) *api.Error {
	failing := map[string]bool{}
	for _, f := range req.Failures {
		failing[f.Volume] = true
		v := m.fsm.volume(f.Volume)
		if v == nil || !v.has(req.ServerID) || (f.ID != 0 && f.ID != v.ID) {
			m.log.Warn("volume_failure_ignored", "volume", f.Volume, "server", req.ServerID, "id", f.ID, "reason", truncate(f.Reason, maxFailureReason))
			continue
		}
		reason := truncate(strings.TrimSpace(f.Reason), maxFailureReason)
		if reason == "" {
			reason = "unspecified"
		}
		if v.Failure != nil && v.Failure.Server == req.ServerID && v.Failure.Reason == reason {
			continue
		}
		res := m.apply(command{Op: opFail, Name: v.Name, ID: v.ID, Failure: &VolumeFailureRecord{Server: req.ServerID, Reason: reason}})
		if res.Err != nil {
			if res.Err.Code == api.CodeNotLeader {
				return res.Err
			}
			m.log.Warn("volume_failure_apply_failed", "volume", v.Name, "server", req.ServerID, "err", res.Err)
			continue
		}
		m.log.Warn("volume_failed", "volume", v.Name, "id", v.ID, "server", req.ServerID, "reason", reason)
	}
	for name, r := range reports {
		if failing[name] {
			continue
		}
		v := m.fsm.volume(name)
		if v == nil || v.Failure == nil || v.Failure.Server != req.ServerID || (r.ID != 0 && r.ID != v.ID) {
			continue
		}
		res := m.apply(command{Op: opFail, Name: v.Name, ID: v.ID})
		if res.Err != nil {
			if res.Err.Code == api.CodeNotLeader {
				return res.Err
			}
			continue
		}
		m.log.Info("volume_failure_cleared", "volume", v.Name, "id", v.ID, "server", req.ServerID, "reason", "server_hosts_it")
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "..."
}

// fastWindow bounds how long an unconfirmed assignment keeps its server on
// the fast heartbeat (a server that cannot apply it goes back to normal).
const fastWindow = 10 * time.Second

// fastHeartbeat is the interval asked of a server while one of its
// volumes changes (new role or epoch, withheld lease, pending failover),
// so that failovers and acting-set changes reach every member within
// about 100 ms instead of a full heartbeat interval.
func (m *Master) fastHeartbeat() time.Duration {
	return min(m.cfg.HeartbeatInterval, max(m.cfg.HeartbeatInterval/5, 100*time.Millisecond))
}
