package master

// Raft membership: joins and removals of masters.
//
// A join never costs the cluster its quorum. The leader refuses a join whose
// ID or raft address clashes with a member's, or whose raft address does not
// answer a TCP dial; otherwise it adds the new master as a non-voter (it
// receives the log but counts for no quorum). The leader's reconciler then
// polls the joiner's /v1/status: once the joiner has applied the
// configuration that added it and is within catchUpMaxLag entries of the
// commit index, it is promoted to voter. A non-voter that does not catch up
// within Config.JoinCatchUpTimeout is removed again. Removals of dead
// members are an operator's call (POST /v1/raft/remove); they are refused
// when they would remove the leader, the last voter, or leave the remaining
// voters without a live majority.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/blockd/blockd/api"
)

const (
	// joinDialTimeout bounds the leader's reachability check of a joiner's
	// raft address.
	joinDialTimeout = 2 * time.Second
	// catchUpMaxLag is how many committed entries a non-voter may still miss
	// when it is promoted.
	catchUpMaxLag = 32
	// memberProbeTimeout bounds one /v1/status poll of another master.
	memberProbeTimeout = 2 * time.Second
	// reconcileInterval is how often the leader looks at its non-voters.
	reconcileInterval = 250 * time.Millisecond
	// configChangeTimeout bounds the enqueueing of a configuration change.
	configChangeTimeout = 10 * time.Second
	// waitLogInterval rate-limits raft_nonvoter_waiting events per member.
	waitLogInterval = 5 * time.Second
)

// member is one server of a raft configuration.
type member struct {
	ID, Addr string
	Voter    bool
}

func membersOf(c raft.Configuration) []member {
	out := make([]member, 0, len(c.Servers))
	for _, s := range c.Servers {
		out = append(out, member{ID: string(s.ID), Addr: string(s.Address), Voter: s.Suffrage == raft.Voter})
	}
	return out
}

func (mb member) suffrage() string {
	if mb.Voter {
		return api.SuffrageVoter
	}
	return api.SuffrageNonvoter
}

func apiMembers(ms []member) []api.RaftMember {
	out := make([]api.RaftMember, 0, len(ms))
	for _, mb := range ms {
		out = append(out, api.RaftMember{ID: mb.ID, RaftAddr: mb.Addr, Suffrage: mb.suffrage()})
	}
	return out
}

// memberErr builds an error for a code whose status api.StatusFor does not
// know.
func memberErr(code string, status int, format string, a ...any) *api.Error {
	return &api.Error{Code: code, Message: fmt.Sprintf(format, a...), Status: status}
}

// validHostPort reports why s is not a "host:port" with a non-empty host and
// a port in 1..65535 ("" when it is one).
func validHostPort(s string) string {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) {
			return ae.Err // without the (maybe huge) address
		}
		return clip(err.Error())
	}
	if host == "" {
		return "empty host"
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Sprintf("port %q is not in 1..65535", port)
	}
	return ""
}

// validateJoin checks the shape of a join request.
func validateJoin(req api.JoinRequest) *api.Error {
	if req.ID == "" || req.RaftAddr == "" {
		return api.Errorf(api.CodeBadRequest, "join needs id and raft_addr (got id=%q raft_addr=%q)", req.ID, req.RaftAddr)
	}
	if why := validHostPort(req.ID); why != "" {
		return api.Errorf(api.CodeBadRequest, "join id %q must be the joining master's API address host:port (it is its raft ID): %s", clip(req.ID), why)
	}
	if why := validHostPort(req.RaftAddr); why != "" {
		return api.Errorf(api.CodeBadRequest, "join raft_addr %q must be host:port: %s", clip(req.RaftAddr), why)
	}
	return nil
}

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

type joinAction int

const (
	joinAdd             joinAction = iota // a new member: add it as a non-voter
	joinAlreadyVoter                      // the same ID at the same address, a voter
	joinAlreadyNonvoter                   // the same ID at the same address, catching up
)

// decideJoin decides a join of id at addr against the current members.
func decideJoin(ms []member, id, addr string) (joinAction, *api.Error) {
	for _, mb := range ms {
		switch {
		case mb.ID == id && mb.Addr == addr:
			if mb.Voter {
				return joinAlreadyVoter, nil
			}
			return joinAlreadyNonvoter, nil
		case mb.ID == id:
			return 0, memberErr(api.CodeMemberConflict, http.StatusConflict,
				"master %s is already a member (%s) at raft address %s, not %s; remove it first (POST /v1/raft/remove)", id, mb.suffrage(), mb.Addr, addr)
		case mb.Addr == addr:
			return 0, memberErr(api.CodeMemberConflict, http.StatusConflict,
				"raft address %s already belongs to master %s (%s); a join from %s cannot take it", addr, mb.ID, mb.suffrage(), id)
		}
	}
	return joinAdd, nil
}

// checkFresh refuses a joiner that already has raft state. Raft trusts any
// higher term: a leader replicating to a master of another cluster would
// overwrite that cluster's log, or step down on its term. A master started
// with --join and an empty data directory has term 0, no log, no peers.
func checkFresh(id string, st *api.StatusResponse) *api.Error {
	if st.ID != id {
		return memberErr(api.CodeMemberConflict, http.StatusConflict, "the master at %s answers as %q, not as %s", id, st.ID, id)
	}
	if st.Term == 0 && st.Applied == 0 && len(st.Peers) == 0 && st.Leader == "" {
		return nil
	}
	return memberErr(api.CodeJoinerNotFresh, http.StatusConflict,
		"master %s already has raft state (term %d, applied index %d, peers [%s], leader %q); only a master with an empty data directory can join",
		id, st.Term, st.Applied, strings.Join(st.Peers, ","), st.Leader)
}

// catchUp is the leader's memory of one non-voter.
type catchUp struct {
	since  time.Time // when this leader first saw it as a non-voter
	target uint64    // a configuration index that already contained it
}

// joinerStatus is what a non-voter's /v1/status said (or why it said nothing).
type joinerStatus struct {
	ID      string
	Leader  string // whom it follows
	Applied uint64
	Err     error
}

type verdict int

const (
	verdictWait verdict = iota
	verdictPromote
	verdictDrop
)

// catchUpVerdict decides a non-voter's fate from its latest status, the
// leader's ID and commit index, and how long it has been waiting. Only a
// joiner that follows this leader and has applied its own join has proven
// that the leader's raft traffic reaches it.
func catchUpVerdict(id, leader string, p catchUp, st joinerStatus, commit uint64, now time.Time, timeout time.Duration) (verdict, string) {
	var why string
	switch {
	case st.Err != nil:
		why = fmt.Sprintf("status of %s unavailable: %v", id, st.Err)
	case st.ID != id:
		why = fmt.Sprintf("%s answers as master %q", id, st.ID)
	case st.Leader != leader:
		why = fmt.Sprintf("%s follows leader %q, not %s", id, st.Leader, leader)
	case st.Applied < p.target:
		why = fmt.Sprintf("applied index %d, has not applied its own join at %d", st.Applied, p.target)
	case commit > st.Applied+catchUpMaxLag:
		why = fmt.Sprintf("applied index %d, %d behind the commit index %d", st.Applied, commit-st.Applied, commit)
	default:
		return verdictPromote, fmt.Sprintf("applied index %d, commit index %d", st.Applied, commit)
	}
	if waited := now.Sub(p.since); waited >= timeout {
		return verdictDrop, fmt.Sprintf("not caught up after %v: %s", waited.Round(time.Millisecond), why)
	}
	return verdictWait, why
}

// decideRemove decides the removal of target. alive tells which members
// answered as followers of this leader just now (the leader counts as
// alive).
func decideRemove(ms []member, leader, target string, alive map[string]bool) *api.Error {
	var t *member
	voters := 0
	for i := range ms {
		if ms[i].ID == target {
			t = &ms[i]
		}
		if ms[i].Voter {
			voters++
		}
	}
	if t == nil {
		return api.Errorf(api.CodeNotFound, "master %s is not in the raft configuration", target)
	}
	if target == leader {
		return memberErr(api.CodeRemoveRefused, http.StatusConflict,
			"master %s is the leader; stop it so another master is elected, then remove it through the new leader", target)
	}
	if !t.Voter {
		return nil // a non-voter counts for no quorum
	}
	if voters <= 1 {
		return memberErr(api.CodeRemoveRefused, http.StatusConflict, "master %s is the last voter", target)
	}
	remaining, live := voters-1, 0
	var dead []string
	for _, mb := range ms {
		if !mb.Voter || mb.ID == target {
			continue
		}
		if mb.ID == leader || alive[mb.ID] {
			live++
		} else {
			dead = append(dead, mb.ID)
		}
	}
	if need := remaining/2 + 1; live < need {
		return memberErr(api.CodeRemoveRefused, http.StatusConflict,
			"removing %s would leave %d voters of which only %d are alive (need %d; not answering: %s); remove a dead one instead",
			target, remaining, live, need, strings.Join(dead, ","))
	}
	return nil
}

// membership is the leader's memory of non-voters catching up.
type membership struct {
	// changeMu serialises the configuration changes this master makes
	// (joins, removals, promotions, drops). Held across raft calls only.
	changeMu sync.Mutex

	mu      sync.Mutex
	pending map[string]*catchUp
	waitLog map[string]time.Time
}

func (mm *membership) reset() {
	mm.mu.Lock()
	mm.pending, mm.waitLog = nil, nil
	mm.mu.Unlock()
}

// track records id as a non-voter that is catching up (if not known yet).
func (mm *membership) track(id string, now time.Time, target uint64) catchUp {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	if mm.pending == nil {
		mm.pending, mm.waitLog = map[string]*catchUp{}, map[string]time.Time{}
	}
	p := mm.pending[id]
	if p == nil {
		p = &catchUp{since: now, target: target}
		mm.pending[id] = p
	}
	return *p
}

func (mm *membership) forget(id string) {
	mm.mu.Lock()
	delete(mm.pending, id)
	delete(mm.waitLog, id)
	mm.mu.Unlock()
}

// retain forgets every tracked non-voter not in keep.
func (mm *membership) retain(keep map[string]bool) {
	mm.mu.Lock()
	for id := range mm.pending {
		if !keep[id] {
			delete(mm.pending, id)
			delete(mm.waitLog, id)
		}
	}
	mm.mu.Unlock()
}

// shouldLogWait rate-limits raft_nonvoter_waiting events.
func (mm *membership) shouldLogWait(id string, now time.Time) bool {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	if mm.waitLog == nil {
		mm.waitLog = map[string]time.Time{}
	}
	if last, ok := mm.waitLog[id]; ok && now.Sub(last) < waitLogInterval {
		return false
	}
	mm.waitLog[id] = now
	return true
}

// configuration returns the latest raft configuration and its index.
func (m *Master) configuration() ([]member, uint64, error) {
	f := m.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, 0, fmt.Errorf("read raft configuration: %w", err)
	}
	return membersOf(f.Configuration()), f.Index(), nil
}

// configChangeErr maps a failed configuration change to an API error.
func (m *Master) configChangeErr(what string, err error) *api.Error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrRaftShutdown):
		return notLeader(m)
	case strings.Contains(err.Error(), "configuration changed since"):
		return memberErr(api.CodeMemberConflict, http.StatusConflict, "%s: the raft configuration changed meanwhile; retry: %v", what, err)
	default:
		return api.Errorf(api.CodeInternal, "%s: %v", what, err)
	}
}

// probeStatus asks master id (its API address) for its /v1/status.
func (m *Master) probeStatus(id string) (*api.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), memberProbeTimeout)
	defer cancel()
	st, err := m.apiClient([]string{id}).Status(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("probe %s: %w", id, err)
	}
	return st, nil
}

// joinMember serves POST /v1/raft/join on the leader.
func (m *Master) joinMember(req api.JoinRequest) (*api.JoinResponse, *api.Error) {
	refuse := func(e *api.Error) (*api.JoinResponse, *api.Error) {
		m.log.Warn("raft_join_refused", "id", clip(req.ID), "raft_addr", clip(req.RaftAddr), "code", e.Code, "reason", e.Message)
		return nil, e
	}
	if e := validateJoin(req); e != nil {
		return refuse(e)
	}
	if m.netTrans == nil {
		return refuse(memberErr(api.CodeJoinUnsupported, http.StatusConflict,
			"master %s runs alone on an in-memory raft transport and cannot add %s; run masters with a raft address (blockd master --raft ADDR) to form a cluster", m.id, req.ID))
	}
	m.mem.changeMu.Lock()
	defer m.mem.changeMu.Unlock()
	ms, idx, err := m.configuration()
	if err != nil {
		return refuse(api.Errorf(api.CodeInternal, "join %s: %v", req.ID, err))
	}
	act, e := decideJoin(ms, req.ID, req.RaftAddr)
	if e != nil {
		return refuse(e)
	}
	switch act {
	case joinAlreadyVoter:
		m.log.Info("raft_join_repeated", "id", req.ID, "raft_addr", req.RaftAddr, "suffrage", api.SuffrageVoter)
		return &api.JoinResponse{ID: req.ID, RaftAddr: req.RaftAddr, Suffrage: api.SuffrageVoter, Message: "already a voter"}, nil
	case joinAlreadyNonvoter:
		m.log.Info("raft_join_repeated", "id", req.ID, "raft_addr", req.RaftAddr, "suffrage", api.SuffrageNonvoter)
		return &api.JoinResponse{ID: req.ID, RaftAddr: req.RaftAddr, Suffrage: api.SuffrageNonvoter, Message: "a non-voter catching up; promoted to voter once caught up"}, nil
	}
	conn, err := net.DialTimeout("tcp", req.RaftAddr, joinDialTimeout)
	if err != nil {
		return refuse(memberErr(api.CodeRaftUnreachable, http.StatusUnprocessableEntity,
			"raft address %s of master %s is unreachable from the leader %s: %v", req.RaftAddr, req.ID, m.id, err))
	}
	conn.Close()
	st, err := m.probeStatus(req.ID)
	if err != nil {
		return refuse(memberErr(api.CodeJoinerUnreachable, http.StatusUnprocessableEntity,
			"master %s (its id is its API address) does not answer GET /v1/status from the leader %s: %v", req.ID, m.id, err))
	}
	if e := checkFresh(req.ID, st); e != nil {
		return refuse(e)
	}
	f := m.raft.AddNonvoter(raft.ServerID(req.ID), raft.ServerAddress(req.RaftAddr), idx, configChangeTimeout)
	if err := f.Error(); err != nil {
		return refuse(m.configChangeErr("add non-voter "+req.ID, err))
	}
	m.mem.track(req.ID, time.Now(), f.Index())
	m.log.Info("raft_nonvoter_added", "id", req.ID, "raft_addr", req.RaftAddr, "index", f.Index(),
		"catch_up_timeout_ms", m.cfg.JoinCatchUpTimeout.Milliseconds())
	return &api.JoinResponse{ID: req.ID, RaftAddr: req.RaftAddr, Suffrage: api.SuffrageNonvoter,
		Message: "added as a non-voter; promoted to voter once caught up"}, nil
}

// removeMember serves POST /v1/raft/remove on the leader.
func (m *Master) removeMember(req api.RemoveRequest) (*api.RemoveResponse, *api.Error) {
	refuse := func(e *api.Error) (*api.RemoveResponse, *api.Error) {
		m.log.Warn("raft_remove_refused", "id", clip(req.ID), "code", e.Code, "reason", e.Message)
		return nil, e
	}
	if req.ID == "" {
		return refuse(api.Errorf(api.CodeBadRequest, "remove needs id (the master's API address)"))
	}
	m.mem.changeMu.Lock()
	defer m.mem.changeMu.Unlock()
	ms, idx, err := m.configuration()
	if err != nil {
		return refuse(api.Errorf(api.CodeInternal, "remove %s: %v", req.ID, err))
	}
	alive := m.probeMembers(ms)
	if e := decideRemove(ms, m.id, req.ID, alive); e != nil {
		return refuse(e)
	}
	var target member
	for _, mb := range ms {
		if mb.ID == req.ID {
			target = mb
		}
	}
	if err := m.raft.RemoveServer(raft.ServerID(req.ID), idx, configChangeTimeout).Error(); err != nil {
		return refuse(m.configChangeErr("remove "+req.ID, err))
	}
	m.mem.forget(req.ID)
	left, _, err := m.configuration()
	if err != nil {
		left = nil
	}
	voters := 0
	for _, mb := range left {
		if mb.Voter {
			voters++
		}
	}
	m.log.Info("raft_member_removed", "id", target.ID, "raft_addr", target.Addr, "suffrage", target.suffrage(),
		"target_alive", alive[target.ID], "reason", "operator", "voters", voters, "members", len(left))
	return &api.RemoveResponse{ID: req.ID, Members: apiMembers(left)}, nil
}

// probeMembers polls every other member's status in parallel: a member is
// alive when it answers as itself and names this master as its leader.
func (m *Master) probeMembers(ms []member) map[string]bool {
	alive := map[string]bool{m.id: true}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, mb := range ms {
		if mb.ID == m.id {
			continue
		}
		wg.Add(1)
		go func(id string) {
			defer wg.Done()
			st, err := m.probeStatus(id)
			ok := err == nil && st.ID == id && st.Leader == m.id
			mu.Lock()
			alive[id] = ok
			mu.Unlock()
		}(mb.ID)
	}
	wg.Wait()
	return alive
}

// reconcileMembers runs on every master; as the leader it promotes
// non-voters that caught up and drops those that did not in time.
func (m *Master) reconcileMembers() {
	defer m.wg.Done()
	t := time.NewTicker(reconcileInterval)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
		}
		if m.raft.State() != raft.Leader {
			m.mem.reset() // a later term starts every deadline afresh
			continue
		}
		m.reconcileOnce(time.Now())
	}
}

func (m *Master) reconcileOnce(now time.Time) {
	ms, idx, err := m.configuration()
	if err != nil {
		m.log.Warn("raft_reconcile_failed", "err", err)
		return
	}
	keep := map[string]bool{}
	for _, mb := range ms {
		if mb.Voter || mb.ID == m.id {
			continue
		}
		keep[mb.ID] = true
		p := m.mem.track(mb.ID, now, idx)
		var js joinerStatus
		if st, err := m.probeStatus(mb.ID); err != nil {
			js.Err = err
		} else {
			js.ID, js.Leader, js.Applied = st.ID, st.Leader, st.Applied
		}
		decidedAt := time.Now()
		v, why := catchUpVerdict(mb.ID, m.id, p, js, m.raft.CommitIndex(), decidedAt, m.cfg.JoinCatchUpTimeout)
		switch v {
		case verdictWait:
			if m.mem.shouldLogWait(mb.ID, decidedAt) {
				m.log.Info("raft_nonvoter_waiting", "id", mb.ID, "raft_addr", mb.Addr, "reason", why,
					"waited_ms", decidedAt.Sub(p.since).Milliseconds())
			}
		case verdictPromote:
			m.changeMember(mb, idx, func() raft.IndexFuture {
				return m.raft.AddVoter(raft.ServerID(mb.ID), raft.ServerAddress(mb.Addr), idx, configChangeTimeout)
			}, "raft_voter_promoted", why, decidedAt.Sub(p.since))
		case verdictDrop:
			m.changeMember(mb, idx, func() raft.IndexFuture {
				return m.raft.RemoveServer(raft.ServerID(mb.ID), idx, configChangeTimeout)
			}, "raft_nonvoter_dropped", why, decidedAt.Sub(p.since))
		}
	}
	m.mem.retain(keep)
}

// changeMember applies a promotion or drop decided on configuration idx;
// the change fails harmlessly (and is decided again) if the configuration
// moved on meanwhile.
func (m *Master) changeMember(mb member, idx uint64, change func() raft.IndexFuture, event, reason string, waited time.Duration) {
	m.mem.changeMu.Lock()
	defer m.mem.changeMu.Unlock()
	if err := change().Error(); err != nil {
		m.log.Warn("raft_member_change_failed", "event", event, "id", mb.ID, "raft_addr", mb.Addr, "config_index", idx, "err", err)
		return
	}
	m.mem.forget(mb.ID)
	m.log.Info(event, "id", mb.ID, "raft_addr", mb.Addr, "reason", reason, "waited_ms", waited.Milliseconds())
}

// peersFile is the name, in the data directory, of an operator's forced
// raft configuration (hashicorp/raft's peers.json format:
// [{"id": API_ADDR, "address": RAFT_ADDR, "non_voter": false}, ...]).
const peersFile = "peers.json"

// recoverConfiguration applies DataDir/peers.json, if present, before raft
// starts: the offline way back for a master whose configuration lost its
// quorum (most voters dead, or a voter that never existed). The file must
// list this master as a voter; on the in-memory transport (single node) it
// must list this master alone, and its address is ignored. The file is
// renamed once applied so that it is applied once.
func (m *Master) recoverConfiguration(rc *raft.Config, logs raft.LogStore, store raft.StableStore, snaps raft.SnapshotStore, self raft.ServerAddress, single bool) error {
	path := filepath.Join(m.cfg.DataDir, peersFile)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("master: %s: %w", path, err)
	}
	conf, err := raft.ReadConfigJSON(path)
	if err != nil {
		return fmt.Errorf("master: %s: want [{\"id\": API_ADDR, \"address\": RAFT_ADDR}, ...]: %w", path, err)
	}
	var selfEntry *raft.Server
	for i := range conf.Servers {
		if conf.Servers[i].ID == rc.LocalID {
			selfEntry = &conf.Servers[i]
		}
	}
	switch {
	case selfEntry == nil || selfEntry.Suffrage != raft.Voter:
		return fmt.Errorf("master: %s must list this master (id %s) as a voter", path, rc.LocalID)
	case single && len(conf.Servers) != 1:
		return fmt.Errorf("master: %s lists %d servers, but this master runs alone on an in-memory raft transport: list only %s", path, len(conf.Servers), rc.LocalID)
	case single:
		selfEntry.Address = self
	case selfEntry.Address != self:
		return fmt.Errorf("master: %s lists this master at raft address %s, but it listens on %s", path, selfEntry.Address, self)
	}
	if err := raft.RecoverCluster(rc, &fsm{st: newState()}, logs, store, snaps, m.transport, conf); err != nil {
		return fmt.Errorf("master: recover raft configuration from %s: %w", path, err)
	}
	done := fmt.Sprintf("%s.applied-%d", path, time.Now().Unix())
	if err := os.Rename(path, done); err != nil {
		return fmt.Errorf("master: raft configuration recovered, but %s could not be renamed (remove it before the next start): %w", path, err)
	}
	ids := make([]string, 0, len(conf.Servers))
	for _, s := range conf.Servers {
		ids = append(ids, string(s.ID))
	}
	m.log.Warn("raft_config_recovered", "id", m.id, "servers", ids, "from", path, "renamed_to", done)
	return nil
}
