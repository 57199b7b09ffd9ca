package master

import (
	"bytes"
	"encoding/json"
	"io"
	"reflect"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

var testActing = ActingThresholds{LeaseTTL: 3 * time.Second, FailGrace: time.Second, SlowGrace: 3 * time.Second, GrowAfter: 500 * time.Millisecond}

// mv builds a healthy member view: in the set, alive, InSync for a while.
func mv(id string, mod func(*MemberView)) MemberView {
	m := MemberView{ID: id, InSet: true, Alive: true, Silent: 100 * time.Millisecond, State: api.StateInSync, FlushedLSN: 100, InSyncFor: 10 * time.Second}
	if mod != nil {
		mod(&m)
	}
	return m
}

func dead(m *MemberView) {
	m.Alive, m.Silent, m.State, m.InSyncFor, m.BadFor = false, 5*time.Second, api.StateDisconnected, -1, 5*time.Second
}

func changes(cs []MemberChange) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.ID+":"+c.Reason)
	}
	return out
}

func TestDecideActingSet(t *testing.T) {
	syncAll3 := func(ms ...MemberView) ActingInput {
		return ActingInput{Durability: api.DurabilitySyncAll, RF: 3, MinCopies: 2, PrimaryAlive: true, Members: ms}
	}
	tests := []struct {
		name                 string
		in                   ActingInput
		acting               []string // nil: no change
		removed, added, kept []string
	}{
		{name: "healthy: no change", in: syncAll3(mv("a", nil), mv("b", nil))},
		{name: "silent for the lease ttl leaves",
			in:     syncAll3(mv("a", func(m *MemberView) { m.Alive, m.Silent = false, 3*time.Second }), mv("b", nil)),
			acting: []string{"b"}, removed: []string{"a:" + ActingReasonNoHeartbeat}},
		{name: "silent but under the ttl stays",
			in: syncAll3(mv("a", func(m *MemberView) { m.Alive, m.Silent = false, 2900*time.Millisecond }), mv("b", nil))},
		{name: "reported failing for the grace leaves",
			in:     syncAll3(mv("a", func(m *MemberView) { m.State, m.BadFor, m.InSyncFor = api.StateDegraded, time.Second, -1 }), mv("b", nil)),
			acting: []string{"b"}, removed: []string{"a:" + ActingReasonFailing}},
		{name: "reported failing under the grace stays",
			in: syncAll3(mv("a", func(m *MemberView) { m.State, m.BadFor, m.InSyncFor = api.StateDisconnected, 900*time.Millisecond, -1 }), mv("b", nil))},
		{name: "connecting (not failing) stays",
			in: syncAll3(mv("a", func(m *MemberView) { m.State, m.InSyncFor, m.SlowFor = api.StateConnecting, -1, 2*time.Second }), mv("b", nil))},
		{name: "catching up for the slow grace leaves",
			in:     syncAll3(mv("a", func(m *MemberView) { m.State, m.InSyncFor, m.SlowFor = api.StateCatchingUp, -1, 3*time.Second }), mv("b", nil)),
			acting: []string{"b"}, removed: []string{"a:" + ActingReasonSlow}},
		{name: "rebuilding for the fail grace leaves",
			in:     syncAll3(mv("a", func(m *MemberView) { m.State, m.InSyncFor, m.BadFor = api.StateRebuilding, -1, time.Second }), mv("b", nil)),
			acting: []string{"b"}, removed: []string{"a:" + ActingReasonFailing}},
		{name: "primary not alive: never shrink around it",
			in: ActingInput{Durability: api.DurabilitySyncAll, RF: 3, MinCopies: 2, Members: []MemberView{mv("a", dead), mv("b", nil)}}},
		{name: "two dead with min_copies 2: the higher flushed lsn is kept",
			in:     syncAll3(mv("a", func(m *MemberView) { dead(m); m.FlushedLSN = 90 }), mv("b", func(m *MemberView) { dead(m); m.FlushedLSN = 95 })),
			acting: []string{"b"}, removed: []string{"a:" + ActingReasonNoHeartbeat}, kept: []string{"b:" + ActingReasonFloor}},
		{name: "rf2 min_copies 1: the last replica may leave (DRBD-like)",
			in:     ActingInput{Durability: api.DurabilitySyncAll, RF: 2, MinCopies: 1, PrimaryAlive: true, Members: []MemberView{mv("a", dead)}},
			acting: []string{}, removed: []string{"a:" + ActingReasonNoHeartbeat}},
		{name: "min_copies 3 keeps every member",
			in:   ActingInput{Durability: api.DurabilitySyncAll, RF: 3, MinCopies: 3, PrimaryAlive: true, Members: []MemberView{mv("a", dead), mv("b", nil)}},
			kept: []string{"a:" + ActingReasonFloor}},
		{name: "stale member InSync long enough is added back",
			in:     syncAll3(mv("a", func(m *MemberView) { m.InSet = false; m.InSyncFor = 500 * time.Millisecond }), mv("b", nil)),
			acting: []string{"a", "b"}, added: []string{"a:" + ActingReasonInSync}},
		{name: "stale member InSync for too short stays out",
			in: syncAll3(mv("a", func(m *MemberView) { m.InSet = false; m.InSyncFor = 100 * time.Millisecond }), mv("b", nil))},
		{name: "stale member not alive stays out",
			in: syncAll3(mv("a", func(m *MemberView) { m.InSet, m.Alive = false, false }), mv("b", nil))},
		{name: "stale member catching up stays out",
			in: syncAll3(mv("a", func(m *MemberView) { m.InSet, m.State, m.InSyncFor = false, api.StateCatchingUp, -1 }), mv("b", nil))},
		{name: "grow and shrink in one decision: the returned member replaces the dead one",
			in:     syncAll3(mv("a", func(m *MemberView) { m.InSet = false }), mv("b", dead)),
			acting: []string{"a"}, added: []string{"a:" + ActingReasonInSync}, removed: []string{"b:" + ActingReasonNoHeartbeat}},
		{name: "sync_quorum: one dead leaves while the other is InSync",
			in:     ActingInput{Durability: api.DurabilitySyncQuorum, RF: 3, MinCopies: 2, PrimaryAlive: true, Members: []MemberView{mv("a", dead), mv("b", nil)}},
			acting: []string{"b"}, removed: []string{"a:" + ActingReasonNoHeartbeat}},
		{name: "sync_quorum: not while the remaining member lags (it may lack acknowledged writes)",
			in: ActingInput{Durability: api.DurabilitySyncQuorum, RF: 3, MinCopies: 2, PrimaryAlive: true,
				Members: []MemberView{mv("a", dead), mv("b", func(m *MemberView) { m.State, m.InSyncFor = api.StateCatchingUp, -1 })}},
			kept: []string{"a:" + ActingReasonRemainingLag}},
		{name: "sync_quorum: two dead both stay (an acknowledged write may be on either alone)",
			in: ActingInput{Durability: api.DurabilitySyncQuorum, RF: 3, MinCopies: 1, PrimaryAlive: true,
				Members: []MemberView{mv("a", dead), mv("b", func(m *MemberView) { dead(m); m.FlushedLSN = 50 })}},
			kept: []string{"b:" + ActingReasonRemainingLag, "a:" + ActingReasonRemainingLag}},
		{name: "best_effort min_copies 1: a dead member leaves",
			in:     ActingInput{Durability: api.DurabilityBestEffort, RF: 2, MinCopies: 1, PrimaryAlive: true, Members: []MemberView{mv("a", dead)}},
			acting: []string{}, removed: []string{"a:" + ActingReasonNoHeartbeat}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := DecideActingSet(tc.in, testActing)
			if !reflect.DeepEqual(d.Acting, tc.acting) {
				t.Errorf("acting = %#v, want %#v", d.Acting, tc.acting)
			}
			if got := changes(d.Removed); !reflect.DeepEqual(got, tc.removed) {
				t.Errorf("removed = %v, want %v", got, tc.removed)
			}
			if got := changes(d.Added); !reflect.DeepEqual(got, tc.added) {
				t.Errorf("added = %v, want %v", got, tc.added)
			}
			if got := changes(d.Kept); !reflect.DeepEqual(got, tc.kept) {
				t.Errorf("kept = %v, want %v", got, tc.kept)
			}
		})
	}
}

func TestTrackReport(t *testing.T) {
	t0 := time.Unix(1000, 0)
	report := func(epoch uint64, states ...string) api.HeartbeatVolume {
		r := api.HeartbeatVolume{Name: "v", ID: 7, Role: api.RolePrimary, Epoch: epoch}
		for i := 0; i+1 < len(states); i += 2 {
			r.Replicas = append(r.Replicas, api.HeartbeatReplica{ServerID: states[i], State: states[i+1]})
		}
		return r
	}
	var tr *VolumeTrack
	tr = TrackReport(tr, 7, 3, report(3, "a", api.StateDisconnected, "b", api.StateInSync), t0)
	// A dead peer alternates Disconnected and Connecting: the clock keeps running.
	tr = TrackReport(tr, 7, 3, report(3, "a", api.StateConnecting, "b", api.StateInSync), t0.Add(500*time.Millisecond))
	tr = TrackReport(tr, 7, 3, report(3, "a", api.StateDisconnected, "b", api.StateInSync), t0.Add(time.Second))
	if a := tr.Members["a"]; !a.BadSince.Equal(t0) || !a.InSyncAt.IsZero() {
		t.Fatalf("a = %+v, want failing since t0", a)
	}
	if b := tr.Members["b"]; !b.InSyncAt.Equal(t0) || !b.BadSince.IsZero() {
		t.Fatalf("b = %+v, want InSync since t0", b)
	}
	// Progress clears it.
	tr = TrackReport(tr, 7, 3, report(3, "a", api.StateCatchingUp, "b", api.StateInSync), t0.Add(2*time.Second))
	if a := tr.Members["a"]; !a.BadSince.IsZero() || !a.NotInSync.Equal(t0) {
		t.Fatalf("catching up: %+v, want the failing clock cleared and not InSync since t0", a)
	}
	if b := tr.Members["b"]; !b.NotInSync.IsZero() {
		t.Fatalf("InSync member has a not-InSync clock: %+v", b)
	}
	// Reports of another epoch, incarnation or role are ignored.
	same := TrackReport(tr, 7, 3, report(2, "a", api.StateDegraded), t0.Add(3*time.Second))
	r := report(3, "a", api.StateDegraded)
	r.Role = api.RoleReplica
	same = TrackReport(same, 7, 3, r, t0.Add(3*time.Second))
	r = report(3, "a", api.StateDegraded)
	r.ID = 6
	same = TrackReport(same, 7, 3, r, t0.Add(3*time.Second))
	if same != tr || !same.Members["a"].BadSince.IsZero() {
		t.Fatalf("a foreign report changed the track: %+v", same.Members["a"])
	}
	// A new epoch starts afresh: Connecting right after it is not failing.
	tr = TrackReport(tr, 7, 4, report(4, "a", api.StateConnecting, "b", api.StateConnecting), t0.Add(4*time.Second))
	if tr.Epoch != 4 || !tr.Members["a"].BadSince.IsZero() || !tr.Members["b"].InSyncAt.IsZero() {
		t.Fatalf("after the epoch bump: %+v", tr)
	}
	// A member missing from a report is no longer InSync.
	tr = TrackReport(tr, 7, 4, report(4, "a", api.StateInSync, "b", api.StateInSync), t0.Add(5*time.Second))
	tr = TrackReport(tr, 7, 4, report(4, "a", api.StateInSync), t0.Add(6*time.Second))
	if !tr.Members["b"].InSyncAt.IsZero() || tr.Members["a"].InSyncAt != t0.Add(5*time.Second) {
		t.Fatalf("unreported member: %+v", tr.Members)
	}
}

func TestFlushGate(t *testing.T) {
	in := map[string]string{"a": api.StateInSync, "b": api.StateInSync, "c": api.StateDisconnected}
	tests := []struct {
		name       string
		durability string
		rf, min    int
		acting     []string
		primaryOK  bool
		ok         bool
		blocker    string
	}{
		{"sync_all all InSync", api.DurabilitySyncAll, 3, 2, []string{"a", "b"}, true, true, ""},
		{"sync_all a member behind", api.DurabilitySyncAll, 3, 2, []string{"a", "c"}, true, false, "sync_all: acting-set member(s) not InSync: c"},
		{"sync_all shrunk to one", api.DurabilitySyncAll, 3, 2, []string{"a"}, true, true, ""},
		{"sync_all below min_copies", api.DurabilitySyncAll, 3, 2, []string{}, true, false, "below_min_copies: 1 durable copies of min_copies 2"},
		{"rf2 alone with min 1", api.DurabilitySyncAll, 2, 1, []string{}, true, true, ""},
		{"quorum one down", api.DurabilitySyncQuorum, 3, 2, []string{"a", "c"}, true, true, ""},
		{"quorum two down", api.DurabilitySyncQuorum, 3, 1, []string{"c"}, true, false, "below_quorum: 1 durable copies of 2 needed (not InSync: c)"},
		{"sync_all kept member below min", api.DurabilitySyncAll, 3, 2, []string{"c"}, true, false, "below_min_copies: 1 durable copies of min_copies 2 (not InSync: c)"},
		{"best_effort min 1", api.DurabilityBestEffort, 3, 1, []string{"c"}, true, true, ""},
		{"primary unconfirmed", api.DurabilitySyncAll, 3, 2, []string{"a", "b"}, false, false, "primary_not_confirmed: the primary has not reported this epoch recently"},
	}
	for _, tc := range tests {
		ok, why := FlushGate(tc.durability, tc.rf, tc.min, tc.acting, in, tc.primaryOK)
		if ok != tc.ok || why != tc.blocker {
			t.Errorf("%s: %v %q, want %v %q", tc.name, ok, why, tc.ok, tc.blocker)
		}
	}
}

func TestFailoverQuorumOK(t *testing.T) {
	tests := []struct {
		durability                string
		rf, min, acting, eligible int
		ok                        bool
	}{
		{api.DurabilitySyncAll, 3, 2, 2, 1, true},     // every member has every ack
		{api.DurabilitySyncAll, 3, 2, 1, 1, true},     // shrunk set
		{api.DurabilitySyncAll, 3, 2, 1, 0, false},    // nobody
		{api.DurabilitySyncQuorum, 3, 2, 2, 2, true},  // both replicas: one has each ack
		{api.DurabilitySyncQuorum, 3, 2, 2, 1, false}, // the other may hold acks alone
		{api.DurabilitySyncQuorum, 3, 2, 1, 1, true},  // shrunk: the member has every ack
		{api.DurabilityBestEffort, 3, 1, 2, 1, true},  // nothing promised
	}
	for _, tc := range tests {
		if ok, need := FailoverQuorumOK(tc.durability, tc.rf, tc.min, tc.acting, tc.eligible); ok != tc.ok {
			t.Errorf("%+v: ok=%v (need %d)", tc, ok, need)
		}
	}
}

// A snapshot written before acting sets existed loads with every replica
// acting and the default min_copies; a reassign logged then (no acting
// set in the command) keeps that meaning.
func TestLegacyRecordLoads(t *testing.T) {
	legacy := `{"volumes":{"v":{"name":"v","id":5,"size_bytes":1048576,"block_size":4096,"rf":3,"durability":"sync_all",
		"epoch":2,"primary":"a","replicas":["b","c"]}},"servers":{},"tombstones":{}}`
	f := &fsm{st: newState()}
	if err := f.Restore(io.NopCloser(bytes.NewBufferString(legacy))); err != nil {
		t.Fatal(err)
	}
	v := f.volume("v")
	if !reflect.DeepEqual(v.ActingSet, []string{"b", "c"}) || v.EffectiveMinCopies() != 2 || len(v.Stale()) != 0 {
		t.Fatalf("legacy record: acting %v min %d stale %v", v.ActingSet, v.EffectiveMinCopies(), v.Stale())
	}
	old := `{"op":"reassign","name":"v","id":5,"expect_epoch":2,"primary":"b","replicas":["c","a"]}`
	var c command
	if err := json.Unmarshal([]byte(old), &c); err != nil {
		t.Fatal(err)
	}
	r := f.st.apply(&c, 9)
	if r.Err != nil || !reflect.DeepEqual(r.Vol.ActingSet, []string{"c", "a"}) {
		t.Fatalf("old reassign: %+v %v", r.Vol, r.Err)
	}
	// An explicitly empty acting set survives a snapshot round trip (it is
	// not "absent").
	if r := f.st.apply(&command{Op: opSetActing, Name: "v", ID: 5, ExpectEpoch: 3, ActingSet: []string{}}, 10); r.Err != nil {
		t.Fatal(r.Err)
	}
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	f2 := &fsm{st: newState()}
	if err := f2.Restore(io.NopCloser(bytes.NewReader(snap.(*fsmSnapshot).data))); err != nil {
		t.Fatal(err)
	}
	if v := f2.volume("v"); v.ActingSet == nil || len(v.ActingSet) != 0 || !reflect.DeepEqual(v.Stale(), []string{"c", "a"}) {
		t.Fatalf("empty acting set after restore: %#v stale %v", v.ActingSet, v.Stale())
	}
}

// applyJSON applies c the way raft does: encoded, then decoded.
func applyJSON(t *testing.T, s *fsmState, c command, index uint64) *applyResult {
	t.Helper()
	data, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	var d command
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	return s.apply(&d, index)
}

func TestFSMActingOps(t *testing.T) {
	s := newState()
	r := applyJSON(t, s, command{Op: opCreate, Volume: &VolumeRecord{Name: "v", SizeBytes: 1 << 20, BlockSize: 4096, RF: 3,
		Durability: api.DurabilitySyncAll, Primary: "a", Replicas: []string{"b", "c"}}}, 10)
	if r.Err != nil || !reflect.DeepEqual(r.Vol.ActingSet, []string{"b", "c"}) {
		t.Fatalf("create: %+v %v", r.Vol, r.Err)
	}
	if r := applyJSON(t, s, command{Op: opSetActing, Name: "v", ID: 10, ExpectEpoch: 1, ActingSet: []string{"c"}}, 11); r.Err != nil || r.Vol.Epoch != 2 ||
		!reflect.DeepEqual(r.Vol.Stale(), []string{"b"}) {
		t.Fatalf("shrink: %+v %v", r.Vol, r.Err)
	}
	// Compare-and-set: a decision taken at an old epoch is refused.
	if r := applyJSON(t, s, command{Op: opSetActing, Name: "v", ID: 10, ExpectEpoch: 1, ActingSet: []string{"b", "c"}}, 12); r.Err == nil || r.Err.Code != api.CodeEpochChanged {
		t.Fatalf("stale decision: %v", r.Err)
	}
	// The primary or a stranger cannot be a member.
	for _, bad := range [][]string{{"a"}, {"x"}} {
		if r := applyJSON(t, s, command{Op: opSetActing, Name: "v", ID: 10, ExpectEpoch: 2, ActingSet: bad}, 13); r.Err == nil || r.Err.Code != api.CodeBadRequest {
			t.Fatalf("acting %v: %v", bad, r.Err)
		}
	}
	// Failover: the old primary leaves the set in the same command.
	if r := applyJSON(t, s, command{Op: opReassign, Name: "v", ID: 10, ExpectEpoch: 2, Primary: "c", Replicas: FailoverReplicas("a", []string{"b", "c"}, "c"),
		ActingSet: FailoverActing([]string{"c"}, "c")}, 14); r.Err != nil || len(r.Vol.ActingSet) != 0 || !reflect.DeepEqual(r.Vol.Stale(), []string{"b", "a"}) {
		t.Fatalf("failover: %+v %v", r.Vol, r.Err)
	}
	if r := applyJSON(t, s, command{Op: opUpdatePolicy, Name: "v", ID: 10, MinCopies: 3}, 15); r.Err != nil || r.Vol.MinCopies != 3 || r.Vol.Epoch != 4 {
		t.Fatalf("update: %+v %v", r.Vol, r.Err)
	}
	if r := applyJSON(t, s, command{Op: opUpdatePolicy, Name: "v", ID: 10, MinCopies: 4}, 16); r.Err == nil || r.Err.Code != api.CodeBadRequest {
		t.Fatalf("min_copies above rf: %v", r.Err)
	}
	if r := applyJSON(t, s, command{Op: opFail, Name: "v", ID: 10, Failure: &VolumeFailureRecord{Server: "a", Reason: "no space"}}, 17); r.Err != nil || r.Vol.Failure == nil {
		t.Fatalf("fail: %+v %v", r.Vol, r.Err)
	}
	if r := applyJSON(t, s, command{Op: opFail, Name: "v", ID: 9, Failure: &VolumeFailureRecord{Server: "a", Reason: "x"}}, 18); r.Err == nil {
		t.Fatal("a failure of another incarnation was accepted")
	}
	if r := applyJSON(t, s, command{Op: opFail, Name: "v", ID: 10}, 19); r.Err != nil || r.Vol.Failure != nil {
		t.Fatalf("clear failure: %+v %v", r.Vol, r.Err)
	}
}

// A stale replica is a soft rejection: promote --force may pick it.
func TestPromoteStaleNeedsForce(t *testing.T) {
	in := []CandidateInput{rep("old", 200, func(c *CandidateInput) { c.InActing = false }), rep("member", 100, nil)}
	cands, best := EvaluateCandidates(7, 3, 200, in, testGates)
	if best != "member" {
		t.Fatalf("best = %q: a stale replica with a higher LSN must not win", best)
	}
	if _, _, err := PromoteDecision(cands, best, "p", "old", false, false); err == nil {
		t.Fatal("stale target promoted without force")
	}
	ch, by, err := PromoteDecision(cands, best, "p", "old", true, false)
	if err != nil || ch != "old" || !reflect.DeepEqual(by, []string{api.ReasonStale}) {
		t.Fatalf("forced stale: %s %v %v", ch, by, err)
	}
}

// The acting set through the real master and real heartbeats: shrink on a
// failing report, grow when InSync again, shrink on silence, the
// min_copies floor, update, and a failover that chooses among members only
// while the old primary leaves the set in the same decision.
func TestActingSetLifecycle(t *testing.T) {
	var logs logSink
	ttl := 1500 * time.Millisecond
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", LeaseTTL: ttl, HeartbeatInterval: 100 * time.Millisecond, Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	fs := map[string]*fakeServer{}
	for i, id := range []string{"s1", "s2", "s3"} {
		fs[id] = newFakeServer(id, i+1, c.Addrs())
		fs[id].run(100 * time.Millisecond)
	}
	defer func() {
		for _, f := range fs {
			f.stop()
		}
	}()
	waitFor(t, "3 servers", 20*time.Second, func() bool { ss, _ := c.Servers(ctxT(t)); return len(ss) == 3 })
	v, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "db", SizeBytes: 1 << 30, RF: 3, Durability: "sync_all"})
	if err != nil {
		t.Fatal(err)
	}
	p, r1, r2 := v.Primary.ServerID, v.Replicas[0].ServerID, v.Replicas[1].ServerID
	if v.MinCopies != 2 || !reflect.DeepEqual(v.ActingSet, []string{p, r1, r2}) || len(v.Stale) != 0 {
		t.Fatalf("created: min %d acting %v stale %v", v.MinCopies, v.ActingSet, v.Stale)
	}
	waitFor(t, "healthy", 20*time.Second, func() bool { i := volInfo(t, c, "db"); return i.Status == api.StatusHealthy && i.FlushesOK })
	if a, _ := fs[p].lastAssignment("db"); !reflect.DeepEqual(a.ActingSet, []string{r1, r2}) || a.MinCopies != 2 {
		t.Fatalf("primary's assignment: acting %v min %d", a.ActingSet, a.MinCopies)
	}
	// The leader's view at each step.
	waitActing := func(what string, acting, stale []string) *api.VolumeInfo {
		t.Helper()
		var info *api.VolumeInfo
		waitFor(t, what, 20*time.Second, func() bool {
			info = volInfo(t, c, "db")
			return reflect.DeepEqual(info.ActingSet, acting) && reflect.DeepEqual(info.Stale, stale)
		})
		return info
	}

	// 1. The primary reports r1 failing: it leaves the set (epoch+1).
	e0 := volInfo(t, c, "db").Epoch
	fs[p].setState(r1, api.StateDegraded)
	info := waitActing("r1 out", []string{p, r2}, []string{r1})
	if info.Epoch != e0+1 || len(logs.find("acting_set_shrunk", "volume", "db", "member", r1, "reason", ActingReasonFailing)) == 0 {
		t.Fatalf("shrink: epoch %d (was %d), events %v", info.Epoch, e0, logs.find("acting_set_shrunk"))
	}
	for _, ri := range info.Replicas {
		if (ri.ServerID == r1) != ri.Stale || ri.InActingSet == ri.Stale {
			t.Fatalf("replica info %+v", ri)
		}
	}
	waitFor(t, "primary told", 10*time.Second, func() bool {
		a, _ := fs[p].lastAssignment("db")
		return a.Epoch == info.Epoch && reflect.DeepEqual(a.ActingSet, []string{r2})
	})
	pf, err := c.Preflight(ctxT(t), "db")
	if err != nil {
		t.Fatal(err)
	}
	for _, cd := range pf.Candidates {
		if has := contains(cd.Reasons, api.ReasonStale); has != (cd.ServerID == r1) || (cd.ServerID == r1 && !cd.Forceable) {
			t.Fatalf("preflight candidate %+v", cd)
		}
	}

	// 2. InSync again: added back.
	fs[p].setState(r1, api.StateInSync)
	waitActing("r1 back", []string{p, r1, r2}, []string{})
	if len(logs.find("acting_set_grown", "volume", "db", "member", r1, "reason", ActingReasonInSync)) == 0 {
		t.Fatal("no acting_set_grown event")
	}

	// 3. r2 goes silent: it leaves after the lease TTL; flushes can go on (2 copies).
	fs[r2].stop()
	info = waitActing("r2 out", []string{p, r1}, []string{r2})
	if len(logs.find("acting_set_shrunk", "volume", "db", "member", r2, "reason", ActingReasonNoHeartbeat)) == 0 {
		t.Fatal("no shrink event for the silent member")
	}
	fs[p].setState(r2, api.StateDisconnected)
	waitFor(t, "flushes ok", 10*time.Second, func() bool { return volInfo(t, c, "db").FlushesOK })

	// 4. r1 fails too: kept (min_copies 2), flushes blocked and info says why.
	fs[p].setState(r1, api.StateDisconnected)
	waitFor(t, "kept event", 10*time.Second, func() bool {
		return len(logs.find("acting_member_kept", "volume", "db", "member", r1, "reason", ActingReasonFloor)) > 0
	})
	info = volInfo(t, c, "db")
	if info.FlushesOK || info.FlushBlocker == "" || !reflect.DeepEqual(info.ActingSet, []string{p, r1}) {
		t.Fatalf("below the floor: ok %v blocker %q acting %v", info.FlushesOK, info.FlushBlocker, info.ActingSet)
	}
	t.Logf("flush blocker: %s", info.FlushBlocker)

	// 5. Update: bad values refused; min_copies 1 lets r1 leave as well.
	for _, n := range []int{-1, 4} {
		n := n
		if _, err := c.UpdateVolume(ctxT(t), "db", api.UpdateVolumeRequest{MinCopies: &n}); !api.IsCode(err, api.CodeBadRequest) {
			t.Fatalf("min_copies %d: %v", n, err)
		}
	}
	one := 1
	up, err := c.UpdateVolume(ctxT(t), "db", api.UpdateVolumeRequest{MinCopies: &one})
	if err != nil || up.MinCopies != 1 || up.Epoch <= info.Epoch {
		t.Fatalf("update: %+v %v", up, err)
	}
	waitActing("r1 out at min 1", []string{p}, []string{r1, r2})
	waitFor(t, "flushes ok alone", 10*time.Second, func() bool { return volInfo(t, c, "db").FlushesOK })
	two := 2
	if _, err := c.UpdateVolume(ctxT(t), "db", api.UpdateVolumeRequest{MinCopies: &two}); err != nil {
		t.Fatal(err)
	}

	// 6. r1 recovers (added back); r2 returns but stays failing, with the
	// highest LSN. The primary dies: r1 (a member) is promoted, not r2.
	fs[p].setState(r1, api.StateInSync)
	waitActing("r1 back again", []string{p, r1}, []string{r2})
	fs[r2].run(100 * time.Millisecond)
	fs[p].setLSN("db", 100, 100)
	fs[r1].setLSN("db", 80, 80)
	fs[r2].setLSN("db", 100, 100)
	waitFor(t, "r2 reported", 10*time.Second, func() bool {
		pf, err := c.Preflight(ctxT(t), "db")
		return err == nil && pf.Best == r1 && len(pf.Candidates) == 2 && pf.Candidates[0].ServerID == r2 && contains(pf.Candidates[0].Reasons, api.ReasonStale)
	})
	before := volInfo(t, c, "db").Epoch
	fs[p].stop()
	info = waitActing("failover", []string{r1}, []string{r2, p})
	if info.Primary.ServerID != r1 || info.Epoch != before+1 {
		t.Fatalf("failover: primary %s epoch %d (was %d)", info.Primary.ServerID, info.Epoch, before)
	}
	if len(logs.find("acting_set_failover", "volume", "db", "new_primary", r1, "member", p)) == 0 {
		t.Fatal("no acting_set_failover event")
	}
}

// A server whose assignment changed is asked to heartbeat sooner until it
// confirms; then the normal interval comes back.
func TestFastHeartbeatWhileChanging(t *testing.T) {
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", LeaseTTL: 5 * time.Second, Logger: (&logSink{}).logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	s1 := newFakeServer("s1", 1, c.Addrs())
	resp, err := s1.beat(ctxT(t))
	if err != nil || resp.HeartbeatIntervalMS != 500 {
		t.Fatalf("idle server: interval %d %v", resp.HeartbeatIntervalMS, err)
	}
	if _, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 20, RF: 1}); err != nil {
		t.Fatal(err)
	}
	if resp, _ = s1.beat(ctxT(t)); resp.HeartbeatIntervalMS != 100 {
		t.Fatalf("new assignment: interval %d, want 100", resp.HeartbeatIntervalMS)
	}
	if resp, _ = s1.beat(ctxT(t)); resp.HeartbeatIntervalMS != 500 || !resp.Assignments[0].Confirmed {
		t.Fatalf("confirmed: interval %d confirmed %v", resp.HeartbeatIntervalMS, resp.Assignments[0].Confirmed)
	}
}
