package master

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// ---- pure decisions ----

func TestValidateJoin(t *testing.T) {
	for name, tc := range map[string]struct {
		req  api.JoinRequest
		want string // substring of the error, "" = valid
	}{
		"ok":            {api.JoinRequest{ID: "127.0.0.1:9333", RaftAddr: "127.0.0.1:9433"}, ""},
		"no id":         {api.JoinRequest{RaftAddr: "127.0.0.1:9433"}, "needs id and raft_addr"},
		"no raft_addr":  {api.JoinRequest{ID: "127.0.0.1:9333"}, "needs id and raft_addr"},
		"id not addr":   {api.JoinRequest{ID: "x", RaftAddr: "127.0.0.1:1"}, `join id "x" must be the joining master's API address`},
		"id port 0":     {api.JoinRequest{ID: "127.0.0.1:0", RaftAddr: "127.0.0.1:1"}, "not in 1..65535"},
		"id no host":    {api.JoinRequest{ID: ":9333", RaftAddr: "127.0.0.1:1"}, "empty host"},
		"raft not addr": {api.JoinRequest{ID: "127.0.0.1:9333", RaftAddr: "banana"}, `join raft_addr "banana" must be host:port`},
		"long id":       {api.JoinRequest{ID: strings.Repeat("a", 10000), RaftAddr: "127.0.0.1:1"}, "..."},
	} {
		e := validateJoin(tc.req)
		switch {
		case tc.want == "" && e != nil:
			t.Errorf("%s: refused: %v", name, e)
		case tc.want != "" && e == nil:
			t.Errorf("%s: accepted", name)
		case tc.want != "" && (e.Code != api.CodeBadRequest || !strings.Contains(e.Message, tc.want) || len(e.Message) > 300):
			t.Errorf("%s: %v, want bad_request containing %q (short)", name, e, tc.want)
		}
	}
}

func TestDecideJoin(t *testing.T) {
	ms := []member{{ID: "a:1", Addr: "a:2", Voter: true}, {ID: "b:1", Addr: "b:2"}}
	for name, tc := range map[string]struct {
		id, addr string
		act      joinAction
		code     string
	}{
		"new":                   {"c:1", "c:2", joinAdd, ""},
		"repeat voter":          {"a:1", "a:2", joinAlreadyVoter, ""},
		"repeat nonvoter":       {"b:1", "b:2", joinAlreadyNonvoter, ""},
		"id elsewhere":          {"a:1", "c:2", 0, api.CodeMemberConflict},
		"addr taken":            {"c:1", "a:2", 0, api.CodeMemberConflict},
		"nonvoter id elsewhere": {"b:1", "c:2", 0, api.CodeMemberConflict},
		"nonvoter addr taken":   {"c:1", "b:2", 0, api.CodeMemberConflict},
	} {
		act, e := decideJoin(ms, tc.id, tc.addr)
		if tc.code == "" {
			if e != nil || act != tc.act {
				t.Errorf("%s: %v %v, want %v", name, act, e, tc.act)
			}
			continue
		}
		if e == nil || e.Code != tc.code || e.Status != http.StatusConflict {
			t.Errorf("%s: %v, want %s (409)", name, e, tc.code)
		}
	}
}

func TestCatchUpVerdict(t *testing.T) {
	t0 := time.Unix(1000, 0)
	p := catchUp{since: t0, target: 100}
	const to = 30 * time.Second
	for name, tc := range map[string]struct {
		st     joinerStatus
		commit uint64
		at     time.Duration
		want   verdict
	}{
		"caught up":            {joinerStatus{ID: "n:1", Leader: "l:1", Applied: 110}, 120, time.Second, verdictPromote},
		"caught up at timeout": {joinerStatus{ID: "n:1", Leader: "l:1", Applied: 110}, 120, time.Minute, verdictPromote},
		"before its join":      {joinerStatus{ID: "n:1", Leader: "l:1", Applied: 99}, 100, time.Second, verdictWait},
		"lagging":              {joinerStatus{ID: "n:1", Leader: "l:1", Applied: 100}, 100 + catchUpMaxLag + 1, time.Second, verdictWait},
		"silent":               {joinerStatus{Err: errors.New("refused")}, 100, time.Second, verdictWait},
		"another cluster's":    {joinerStatus{ID: "n:1", Leader: "elsewhere:1", Applied: 500}, 100, time.Second, verdictWait},
		"impostor":             {joinerStatus{ID: "other:1", Leader: "l:1", Applied: 500}, 100, time.Second, verdictWait},
		"silent too long":      {joinerStatus{Err: errors.New("refused")}, 100, to, verdictDrop},
		"lagging too long":     {joinerStatus{ID: "n:1", Leader: "l:1", Applied: 10}, 100, to + time.Second, verdictDrop},
	} {
		v, why := catchUpVerdict("n:1", "l:1", p, tc.st, tc.commit, t0.Add(tc.at), to)
		if v != tc.want || why == "" {
			t.Errorf("%s: verdict %v (%s), want %v", name, v, why, tc.want)
		}
	}
}

func TestDecideRemove(t *testing.T) {
	three := []member{{ID: "l", Voter: true}, {ID: "b", Voter: true}, {ID: "c", Voter: true}, {ID: "n"}}
	for name, tc := range map[string]struct {
		ms     []member
		target string
		alive  map[string]bool
		code   string
	}{
		"dead voter":             {three, "c", map[string]bool{"b": true}, ""},
		"nonvoter":               {three, "n", map[string]bool{}, ""},
		"unknown":                {three, "z", map[string]bool{"b": true}, api.CodeNotFound},
		"leader":                 {three, "l", map[string]bool{"b": true, "c": true}, api.CodeRemoveRefused},
		"live voter, other dead": {three, "b", map[string]bool{"b": true}, api.CodeRemoveRefused},
		"live voter, all alive":  {three, "b", map[string]bool{"b": true, "c": true}, ""},
		"one of two voters":      {[]member{{ID: "l", Voter: true}, {ID: "x", Voter: true}}, "x", nil, ""},
		"leader alone":           {[]member{{ID: "l", Voter: true}}, "l", nil, api.CodeRemoveRefused},
	} {
		e := decideRemove(tc.ms, "l", tc.target, tc.alive)
		if tc.code == "" {
			if e != nil {
				t.Errorf("%s: refused: %v", name, e)
			}
			continue
		}
		if e == nil || e.Code != tc.code {
			t.Errorf("%s: %v, want %s", name, e, tc.code)
		}
	}
}

// ---- real masters ----

// postRaw sends body to path on addr and returns the status and decoded error.
func postRaw(t *testing.T, addr, path, body string) (int, api.Error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctxT(t), http.MethodPost, "http://"+addr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var e api.Error
	_ = json.Unmarshal(data, &e)
	t.Logf("POST %s %s -> %d %s", path, body, resp.StatusCode, bytes.TrimSpace(data))
	return resp.StatusCode, e
}

// members reads m's raft configuration.
func members(t *testing.T, m *Master) []member {
	t.Helper()
	ms, _, err := m.configuration()
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

func voterIDs(ms []member) (voters, nonvoters []string) {
	for _, mb := range ms {
		if mb.Voter {
			voters = append(voters, mb.ID)
		} else {
			nonvoters = append(nonvoters, mb.ID)
		}
	}
	return voters, nonvoters
}

// createWorks creates a volume through c within a bounded time.
func createWorks(t *testing.T, c *api.Client, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if _, err := c.CreateVolume(ctx, api.CreateVolumeRequest{Name: name, SizeBytes: 1 << 20, RF: 1}); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
}

// The case of issue 18: one POST /v1/raft/join naming an unreachable raft
// address against a single master (the one `blockd serve` embeds: in-memory
// raft transport) is refused; the master keeps its single-voter quorum,
// keeps serving, and restarts cleanly. Before the fix the join answered 200,
// the master lost quorum about a second later and never got it back.
func TestJoinUnreachableKeepsSingleMaster(t *testing.T) {
	dir := t.TempDir()
	var logs logSink
	m := startMaster(t, Config{DataDir: dir, APIAddr: "127.0.0.1:0", Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	f := newFakeServer("s1", 1, c.Addrs())
	f.run(200 * time.Millisecond)
	defer f.stop()
	waitFor(t, "server", 20*time.Second, func() bool { ss, err := c.Servers(ctxT(t)); return err == nil && len(ss) == 1 })

	for _, body := range []string{
		`{"id":"x","raft_addr":"127.0.0.1:1"}`,                   // the exact request
		`{"id":"127.0.0.1:1","raft_addr":"127.0.0.1:1"}`,         // a well-formed ID
		`{"id":"127.0.0.1:2","raft_addr":"` + m.APIAddr() + `"}`, // a reachable address
	} {
		st, e := postRaw(t, m.APIAddr(), "/v1/raft/join", body)
		if st < 400 || e.Code == "" || e.Message == "" {
			t.Errorf("join %s: status %d %+v, want a refusal", body, st, e)
		}
	}
	if n := len(logs.find("raft_join_refused")); n != 3 {
		t.Errorf("%d raft_join_refused events, want 3", n)
	}
	// Past the point where the old code lost quorum (leader lease 500ms).
	time.Sleep(2 * time.Second)
	if v, nv := voterIDs(members(t, m)); len(v) != 1 || v[0] != m.ID() || len(nv) != 0 {
		t.Errorf("configuration after refused joins: voters %v non-voters %v", v, nv)
	}
	if !m.IsLeader() {
		t.Errorf("the master lost its leadership: %s", m.raft.State())
	}
	createWorks(t, c, "after-join")

	// A restart keeps working: it elects itself and serves.
	f.stop()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m2 := startMaster(t, Config{DataDir: dir, APIAddr: "127.0.0.1:0", Logger: logs.logger()})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := m2.WaitLeader(ctx); err != nil {
		t.Fatalf("after restart: %v", err)
	}
	c2 := api.NewClient([]string{m2.APIAddr()})
	f2 := newFakeServer("s1", 1, c2.Addrs())
	f2.run(200 * time.Millisecond)
	defer f2.stop()
	createWorks(t, c2, "after-restart")
}

// A single master on a real TCP transport: a join naming a closed raft port
// is refused up front (422 raft_addr_unreachable, naming the address);
// clashing IDs or addresses are refused (409 member_conflict); a repeat of
// the leader's own membership is a no-op.
func TestJoinRefusals(t *testing.T) {
	var logs logSink
	raftAddr := freePort(t)
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: freePort(t), RaftAddr: raftAddr, Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	ghost := freePort(t) // nothing listens there
	_, err := c.JoinMaster(ctxT(t), api.JoinRequest{ID: freePort(t), RaftAddr: ghost})
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.CodeRaftUnreachable || ae.Status != http.StatusUnprocessableEntity || !strings.Contains(ae.Message, ghost) {
		t.Fatalf("join with a closed raft port: %v", err)
	}
	for name, req := range map[string]api.JoinRequest{
		"leader's id elsewhere": {ID: m.ID(), RaftAddr: ghost},
		"leader's raft address": {ID: freePort(t), RaftAddr: raftAddr},
	} {
		_, err := c.JoinMaster(ctxT(t), req)
		if !errors.As(err, &ae) || ae.Code != api.CodeMemberConflict || ae.Status != http.StatusConflict {
			t.Fatalf("%s: %v, want 409 member_conflict", name, err)
		}
	}
	resp, err := c.JoinMaster(ctxT(t), api.JoinRequest{ID: m.ID(), RaftAddr: raftAddr})
	if err != nil || resp.Suffrage != api.SuffrageVoter {
		t.Fatalf("repeat of the leader's membership: %+v %v", resp, err)
	}
	if n := len(logs.find("raft_join_refused")); n != 3 {
		t.Fatalf("%d raft_join_refused events, want 3", n)
	}
	if v, nv := voterIDs(members(t, m)); len(v) != 1 || len(nv) != 0 {
		t.Fatalf("configuration: voters %v non-voters %v", v, nv)
	}
}

// A joiner the leader's raft traffic cannot reach (its join names a raft
// address that accepts TCP but speaks no raft) is added as a non-voter,
// never promoted, and dropped after JoinCatchUpTimeout; the master keeps
// its quorum and serves throughout. Joins whose id does not answer as a
// fresh master are refused before anything changes: one whose API is
// silent, and one naming a master of another cluster (raft would overwrite
// that cluster's log), which keeps leading its own cluster untouched.
func TestJoinNonvoterThatNeverCatchesUpIsDropped(t *testing.T) {
	var logs logSink
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: freePort(t), RaftAddr: freePort(t), JoinCatchUpTimeout: 5 * time.Second, Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	f := newFakeServer("s1", 1, c.Addrs())
	f.run(200 * time.Millisecond)
	defer f.stop()
	waitFor(t, "server", 20*time.Second, func() bool { ss, err := c.Servers(ctxT(t)); return err == nil && len(ss) == 1 })

	// A black hole: accepts connections and closes them.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conn.Close()
		}
	}()
	hole := ln.Addr().String()

	// Refused: the id's API is silent; the id is another cluster's leader.
	if _, err := c.JoinMaster(ctxT(t), api.JoinRequest{ID: freePort(t), RaftAddr: hole}); !api.IsCode(err, api.CodeJoinerUnreachable) {
		t.Fatalf("join with a silent id: %v, want joiner_unreachable", err)
	}
	otherRaft := freePort(t)
	other := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: freePort(t), RaftAddr: otherRaft, Logger: (&logSink{}).logger()})
	if err := other.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	otherTerm := other.raft.CurrentTerm()
	if _, err := c.JoinMaster(ctxT(t), api.JoinRequest{ID: other.ID(), RaftAddr: otherRaft}); !api.IsCode(err, api.CodeJoinerNotFresh) {
		t.Fatalf("join of another cluster's master: %v, want joiner_not_fresh", err)
	}
	if !other.IsLeader() || other.raft.CurrentTerm() != otherTerm {
		t.Fatalf("the other cluster was disturbed: leader %v term %d -> %d", other.IsLeader(), otherTerm, other.raft.CurrentTerm())
	}
	if v, nv := voterIDs(members(t, m)); len(v) != 1 || len(nv) != 0 {
		t.Fatalf("after refused joins: voters %v non-voters %v", v, nv)
	}

	// A fresh master (its own --join goes nowhere, so it waits with an empty
	// data directory); its join is posted naming the black hole.
	j := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: freePort(t), RaftAddr: freePort(t), Join: freePort(t), Logger: (&logSink{}).logger()})
	id := j.ID()
	// Eight identical joins race: one adds it, the others see it added.
	errs := make([]error, 8)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			resp, err := c.JoinMaster(ctxT(t), api.JoinRequest{ID: id, RaftAddr: hole})
			if err == nil && resp.Suffrage != api.SuffrageNonvoter {
				err = errors.New("suffrage " + resp.Suffrage)
			}
			errs[i] = err
		}(i)
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatalf("racing join: %v", err)
		}
	}
	if n := len(logs.find("raft_nonvoter_added", "id", id)); n != 1 {
		t.Fatalf("%d raft_nonvoter_added events, want 1", n)
	}
	if _, nv := voterIDs(members(t, m)); len(nv) != 1 || nv[0] != id {
		t.Fatalf("non-voters %v, want [%s]", nv, id)
	}
	createWorks(t, c, "with-nonvoter") // the non-voter counts for no quorum
	waitFor(t, "the non-voter dropped", 30*time.Second, func() bool { return len(logs.find("raft_nonvoter_dropped", "id", id)) == 1 })
	if v, nv := voterIDs(members(t, m)); len(v) != 1 || len(nv) != 0 {
		t.Fatalf("after the drop: voters %v non-voters %v", v, nv)
	}
	if len(logs.find("raft_voter_promoted")) != 0 {
		t.Fatal("a non-voter that never caught up was promoted")
	}
	t.Logf("drop: %v", logs.find("raft_nonvoter_dropped")[0])
	createWorks(t, c, "after-drop")
}

// An operator removes a dead voter: three masters on real raft TCP, one is
// killed; removing the leader or a live voter (which would leave the dead
// one as half the voters) is refused; removing the dead one succeeds; a new
// master then joins as a non-voter, is promoted once caught up, and the
// cluster survives losing another original member.
func TestRemoveDeadVoterThenJoin(t *testing.T) {
	if testing.Short() {
		t.Skip("3-master cluster in -short")
	}
	var logs logSink
	var apis, rafts, peers []string
	for i := 0; i < 3; i++ {
		apis = append(apis, freePort(t))
		rafts = append(rafts, freePort(t))
		peers = append(peers, apis[i]+"="+rafts[i])
	}
	ms := map[string]*Master{}
	for i := 0; i < 3; i++ {
		ms[apis[i]] = startMaster(t, Config{DataDir: t.TempDir(), APIAddr: apis[i], RaftAddr: rafts[i], Peers: peers,
			LeaseTTL: 2 * time.Second, Logger: logs.logger().With("node", i)})
	}
	leader := func() *Master {
		for _, m := range ms {
			if m.IsLeader() {
				return m
			}
		}
		return nil
	}
	waitFor(t, "a leader", 30*time.Second, func() bool { return leader() != nil })
	ld := leader()
	var followers []*Master
	for _, m := range ms {
		if m != ld {
			followers = append(followers, m)
		}
	}
	dead, live := followers[0], followers[1]
	dead.srv.Close()
	dead.Close()
	delete(ms, dead.ID())

	c := api.NewClient([]string{ld.APIAddr(), live.APIAddr()})
	var ae *api.Error
	for name, id := range map[string]string{"the leader": ld.ID(), "a live voter": live.ID()} {
		_, err := c.RemoveMaster(ctxT(t), api.RemoveRequest{ID: id})
		if !errors.As(err, &ae) || ae.Code != api.CodeRemoveRefused || ae.Status != http.StatusConflict {
			t.Fatalf("remove %s: %v, want 409 remove_refused", name, err)
		}
		t.Logf("remove %s: %v", name, err)
	}
	rr, err := c.RemoveMaster(ctxT(t), api.RemoveRequest{ID: dead.ID()})
	if err != nil {
		t.Fatalf("remove the dead voter: %v", err)
	}
	if len(rr.Members) != 2 {
		t.Fatalf("members after remove: %+v", rr.Members)
	}
	if len(logs.find("raft_member_removed", "id", dead.ID(), "target_alive", false)) != 1 {
		t.Fatal("no raft_member_removed event")
	}
	if _, err := c.RemoveMaster(ctxT(t), api.RemoveRequest{ID: dead.ID()}); !api.IsCode(err, api.CodeNotFound) {
		t.Fatalf("second remove: %v, want not_found", err)
	}
	if st, _ := postRaw(t, ld.APIAddr(), "/v1/raft/remove", `{}`); st != http.StatusBadRequest {
		t.Fatalf("remove without id: %d", st)
	}

	// A new master joins through the live follower (redirected to the leader).
	fresh := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: freePort(t), RaftAddr: freePort(t), Join: live.APIAddr(),
		LeaseTTL: 2 * time.Second, Logger: logs.logger().With("node", "fresh")})
	ms[fresh.ID()] = fresh
	waitFor(t, "the new master promoted", 30*time.Second, func() bool {
		v, nv := voterIDs(members(t, ld))
		return len(v) == 3 && len(nv) == 0
	})
	// The event follows the commit of the change it reports.
	waitFor(t, "raft_voter_promoted", 20*time.Second, func() bool { return len(logs.find("raft_voter_promoted", "id", fresh.ID())) == 1 })
	if len(logs.find("raft_nonvoter_added", "id", fresh.ID())) != 1 {
		t.Fatal("the join did not go non-voter then voter")
	}
	waitFor(t, "the joiner sees itself a voter", 20*time.Second, func() bool { return len(logs.find("raft_joined", "id", fresh.ID())) == 1 })

	// Losing another original member leaves leader + new voter: a quorum.
	live.srv.Close()
	live.Close()
	delete(ms, live.ID())
	c = api.NewClient([]string{ld.APIAddr(), fresh.APIAddr()})
	runFakeServers(t, c.Addrs(), "s1")
	waitFor(t, "server", 30*time.Second, func() bool { ss, err := c.Servers(ctxT(t)); return err == nil && len(ss) == 1 })
	createWorks(t, c, "after-membership-change")
	waitFor(t, "replicated to the new voter", 20*time.Second, func() bool { return fresh.fsm.volume("after-membership-change") != nil })
}

// A data directory wedged the way issue 18 left it (a second voter that
// never existed, so no quorum, so a Candidate forever) comes back with an
// operator's peers.json listing this master alone; the registry survives,
// the file is applied once. A peers.json that leaves this master out is
// refused at start.
func TestPeersJSONRecoversWedgedMaster(t *testing.T) {
	dir := t.TempDir()
	var logs logSink
	m := startMaster(t, Config{DataDir: dir, APIAddr: "127.0.0.1:0", Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	f := newFakeServer("s1", 1, c.Addrs())
	if _, err := f.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	createWorks(t, c, "kept")
	id := m.ID()
	// What the old join did: a voter nobody can reach.
	_ = m.raft.AddVoter("x", "127.0.0.1:1", 0, 2*time.Second).Error()
	waitFor(t, "quorum lost", 30*time.Second, func() bool { return !m.IsLeader() })
	m.Close()

	write := func(body string) {
		if err := os.WriteFile(filepath.Join(dir, peersFile), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for name, body := range map[string]string{
		"without this master": `[{"id":"x","address":"127.0.0.1:1"}]`,
		"two on in-memory":    `[{"id":"` + id + `","address":"a"},{"id":"x","address":"127.0.0.1:1"}]`,
		"garbage":             `{`,
	} {
		write(body)
		m2, err := Start(Config{DataDir: dir, APIAddr: "127.0.0.1:0", Logger: logs.logger()})
		if err == nil {
			m2.Close()
			t.Fatalf("peers.json %s: accepted", name)
		}
		if !strings.Contains(err.Error(), peersFile) {
			t.Fatalf("peers.json %s: %v does not name the file", name, err)
		}
		t.Logf("peers.json %s: %v", name, err)
	}
	write(`[{"id":"` + id + `","address":"ignored on the in-memory transport"}]`)
	m3 := startMaster(t, Config{DataDir: dir, APIAddr: "127.0.0.1:0", Logger: logs.logger()})
	if err := m3.WaitLeader(ctxT(t)); err != nil {
		t.Fatalf("after recovery: %v", err)
	}
	if len(logs.find("raft_config_recovered", "id", id)) != 1 {
		t.Fatal("no raft_config_recovered event")
	}
	if _, err := os.Stat(filepath.Join(dir, peersFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("peers.json still in place: %v", err)
	}
	if v, nv := voterIDs(members(t, m3)); len(v) != 1 || v[0] != id || len(nv) != 0 {
		t.Fatalf("recovered configuration: voters %v non-voters %v", v, nv)
	}
	c3 := api.NewClient([]string{m3.APIAddr()})
	if m3.fsm.volume("kept") == nil {
		t.Fatal("the registry lost volume kept")
	}
	f.c = c3
	if _, err := f.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	createWorks(t, c3, "after-recovery")
	// Applied once: the next start is an ordinary one.
	m3.Close()
	m4 := startMaster(t, Config{DataDir: dir, APIAddr: "127.0.0.1:0", Logger: logs.logger()})
	if err := m4.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if n := len(logs.find("raft_config_recovered")); n != 1 {
		t.Fatalf("%d recoveries, want 1", n)
	}
}

// Two of three masters dead: no leader, so no remove. The survivor is
// stopped, given a peers.json naming itself alone, and restarted: it leads
// with the registry it had; a new master can join it again.
func TestPeersJSONRecoversLostMajority(t *testing.T) {
	if testing.Short() {
		t.Skip("3-master cluster in -short")
	}
	var logs logSink
	var apis, rafts, peers []string
	for i := 0; i < 3; i++ {
		apis = append(apis, freePort(t))
		rafts = append(rafts, freePort(t))
		peers = append(peers, apis[i]+"="+rafts[i])
	}
	var ms []*Master
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	for i := 0; i < 3; i++ {
		ms = append(ms, startMaster(t, Config{DataDir: dirs[i], APIAddr: apis[i], RaftAddr: rafts[i], Peers: peers, Logger: logs.logger().With("node", i)}))
	}
	waitFor(t, "a leader", 30*time.Second, func() bool { return ms[0].IsLeader() || ms[1].IsLeader() || ms[2].IsLeader() })
	c := api.NewClient(apis)
	f := newFakeServer("s1", 1, apis)
	waitFor(t, "a heartbeat", 30*time.Second, func() bool { _, err := f.beat(ctxT(t)); return err == nil })
	createWorks(t, c, "kept")
	waitFor(t, "replicated", 20*time.Second, func() bool { return ms[0].fsm.volume("kept") != nil })
	for _, m := range ms {
		m.srv.Close()
		m.Close()
	}
	if err := os.WriteFile(filepath.Join(dirs[0], peersFile), []byte(`[{"id":"`+apis[0]+`","address":"127.0.0.1:1"}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Start(Config{DataDir: dirs[0], APIAddr: apis[0], RaftAddr: rafts[0], Peers: peers, Logger: logs.logger()}); err == nil ||
		!strings.Contains(err.Error(), "listens on "+rafts[0]) {
		t.Fatalf("peers.json with a wrong address for this master: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dirs[0], peersFile), []byte(`[{"id":"`+apis[0]+`","address":"`+rafts[0]+`"}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	m := startMaster(t, Config{DataDir: dirs[0], APIAddr: apis[0], RaftAddr: rafts[0], Peers: peers, Logger: logs.logger().With("node", "survivor")})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatalf("survivor after recovery: %v", err)
	}
	if m.fsm.volume("kept") == nil {
		t.Fatal("the registry lost volume kept")
	}
	j := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: freePort(t), RaftAddr: freePort(t), Join: apis[0], Logger: logs.logger().With("node", "new")})
	waitFor(t, "the new master promoted", 30*time.Second, func() bool {
		v, nv := voterIDs(members(t, m))
		return len(v) == 2 && len(nv) == 0
	})
	waitFor(t, "replicated to the new master", 20*time.Second, func() bool { return j.fsm.volume("kept") != nil })
}
