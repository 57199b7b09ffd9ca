package replication

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestPlannerTable(t *testing.T) {
	base := Facts{Trusted: true}
	cases := []struct {
		name   string
		f      Facts
		kind   PlanKind
		from   uint64
		to     uint64
		reason string
	}{
		{"in sync", Facts{Trusted: true, ReplicaFlushed: 10, ReplicaHead: 10, PrimaryHead: 10, OldestRetained: 1}, PlanInSync, 0, 0, "caught_up"},
		{"catch up", Facts{Trusted: true, ReplicaFlushed: 5, ReplicaHead: 5, PrimaryHead: 10, OldestRetained: 3}, PlanCatchUp, 6, 10, "wal_covers_gap"},
		{"catch up exactly at S", Facts{Trusted: true, ReplicaFlushed: 5, ReplicaHead: 5, PrimaryHead: 10, OldestRetained: 6}, PlanCatchUp, 6, 10, "wal_covers_gap"},
		{"gap with bitmap", Facts{Trusted: true, ReplicaFlushed: 5, ReplicaHead: 5, PrimaryHead: 10, OldestRetained: 7, BitmapOK: true, BitmapFrom: 4}, PlanResync, 6, 10, "gap_beyond_retention"},
		{"gap bitmap too young", Facts{Trusted: true, ReplicaFlushed: 5, ReplicaHead: 5, PrimaryHead: 10, OldestRetained: 7, BitmapOK: true, BitmapFrom: 7}, PlanRebuild, 0, 0, "gap_beyond_retention_no_bitmap"},
		{"gap no bitmap", Facts{Trusted: true, ReplicaFlushed: 5, ReplicaHead: 5, PrimaryHead: 10, OldestRetained: 7}, PlanRebuild, 0, 0, "gap_beyond_retention_no_bitmap"},
		{"ahead known", Facts{Trusted: true, ReplicaFlushed: 12, ReplicaHead: 12, PrimaryHead: 10, OldestRetained: 1, DivergentKnown: true}, PlanTruncateThenCatchUp, 11, 10, "replica_ahead"},
		{"ahead unflushed tail", Facts{Trusted: true, ReplicaFlushed: 9, ReplicaHead: 12, PrimaryHead: 10, OldestRetained: 1, DivergentKnown: true}, PlanTruncateThenCatchUp, 11, 10, "replica_ahead"},
		{"ahead unknown", Facts{Trusted: true, ReplicaFlushed: 12, ReplicaHead: 12, PrimaryHead: 10, OldestRetained: 1}, PlanRebuild, 0, 0, "replica_ahead_unknown_tail"},
		{"blank empty", Facts{Trusted: true, Blank: true, OldestRetained: 1}, PlanInSync, 0, 0, "both_empty"},
		{"blank wal covers", Facts{Trusted: true, Blank: true, PrimaryHead: 8, OldestRetained: 1}, PlanCatchUp, 1, 8, "blank_wal_covers"},
		{"blank rebuild", Facts{Trusted: true, Blank: true, PrimaryHead: 8, OldestRetained: 5}, PlanRebuild, 0, 0, "blank"},
		{"untrusted", Facts{ReplicaFlushed: 8, ReplicaHead: 8, PrimaryHead: 8, OldestRetained: 1}, PlanRebuild, 0, 0, "untrusted"},
		{"resume", Facts{HasPending: true, PendingEpoch: 3, Epoch: 3, PendingKind: TransferRebuild, PrimaryHead: 8}, PlanResume, 0, 0, "pending_rebuild"},
		{"pending of another epoch", Facts{HasPending: true, PendingEpoch: 2, Epoch: 3, PendingKind: TransferRebuild, ReplicaFlushed: 4, ReplicaHead: 4, PrimaryHead: 8, OldestRetained: 1}, PlanRebuild, 0, 0, "untrusted"},
		{"pending tail recycled", Facts{HasPending: true, PendingEpoch: 3, Epoch: 3, PendingKind: TransferResync, ReplicaFlushed: 4, ReplicaHead: 4, PrimaryHead: 8, OldestRetained: 6}, PlanRebuild, 0, 0, "untrusted"},
		{"escalated catch-up resyncs", Facts{Trusted: true, ReplicaFlushed: 5, ReplicaHead: 5, PrimaryHead: 10, OldestRetained: 3, BitmapOK: true, BitmapFrom: 2, Escalated: "catchup_attempts_exhausted"}, PlanResync, 6, 10, "escalated"},
		{"escalated in-sync resyncs", Facts{Trusted: true, ReplicaFlushed: 10, ReplicaHead: 10, PrimaryHead: 10, OldestRetained: 3, BitmapOK: true, BitmapFrom: 2, Escalated: "x"}, PlanResync, 11, 10, "escalated"},
		{"escalated bitmap too young rebuilds", Facts{Trusted: true, ReplicaFlushed: 5, ReplicaHead: 5, PrimaryHead: 10, OldestRetained: 3, BitmapOK: true, BitmapFrom: 7, Escalated: "x"}, PlanRebuild, 0, 0, "escalated"},
		{"escalated blank rebuilds", Facts{Trusted: true, Blank: true, PrimaryHead: 8, OldestRetained: 1, BitmapOK: true, Escalated: "x"}, PlanRebuild, 0, 0, "escalated"},
		{"escalated truncate stays", Facts{Trusted: true, ReplicaFlushed: 12, ReplicaHead: 12, PrimaryHead: 10, OldestRetained: 1, DivergentKnown: true, Escalated: "x"}, PlanTruncateThenCatchUp, 11, 10, "replica_ahead"},
		{"escalated resume stays", Facts{HasPending: true, PendingEpoch: 3, Epoch: 3, PendingKind: TransferRebuild, PrimaryHead: 8, Escalated: "x"}, PlanResume, 0, 0, "pending_rebuild"},
		{"zero zero", base, PlanInSync, 0, 0, "caught_up"},
	}
	for _, c := range cases {
		p := Decide(c.f)
		if p.Kind != c.kind || p.From != c.from || p.To != c.to || p.Reason != c.reason {
			t.Errorf("%s: got %v [%d,%d] %s (%s), want %v [%d,%d] %s", c.name, p.Kind, p.From, p.To, p.Reason, p.Detail, c.kind, c.from, c.to, c.reason)
		}
		if p.Detail == "" {
			t.Errorf("%s: empty detail", c.name)
		}
	}
	// The truncation point is the planner's: one below the fork, or the
	// primary's head when the replica is ahead.
	for _, c := range []struct {
		f     Facts
		reset uint64
	}{
		{Facts{Trusted: true, ReplicaFlushed: 9, ReplicaHead: 9, PrimaryHead: 12, OldestRetained: 1, ForkLSN: 7, DivergentKnown: true}, 6},
		{Facts{Trusted: true, ReplicaFlushed: 12, ReplicaHead: 12, PrimaryHead: 10, OldestRetained: 1, DivergentKnown: true}, 10},
		{Facts{Trusted: true, ReplicaFlushed: 12, ReplicaHead: 12, PrimaryHead: 10, OldestRetained: 1, ForkLSN: 11, DivergentKnown: true}, 10},
	} {
		if p := Decide(c.f); p.Kind != PlanTruncateThenCatchUp || p.ResetLSN != c.reset {
			t.Errorf("%+v: got %v reset %d, want truncate to %d", c.f, p.Kind, p.ResetLSN, c.reset)
		}
	}
}

func TestDurabilityTable(t *testing.T) {
	in := func(id string, f uint64) ReplicaProgress {
		return ReplicaProgress{ID: id, State: InSync, FlushedLSN: f}
	}
	st := func(id string, s ReplicaState, f uint64) ReplicaProgress {
		return ReplicaProgress{ID: id, State: s, FlushedLSN: f}
	}
	rule := func(mode Durability, rf int, minc int, members ...string) FlushRule {
		return FlushRule{Mode: mode, RF: rf, Members: members, MinCopies: minc}
	}
	cases := []struct {
		name    string
		rule    FlushRule
		reps    []ReplicaProgress
		lsn     uint64
		want    Outcome
		reason  string
		missing []string
	}{
		// best_effort: only MinCopies.
		{"be none", rule(BestEffort, 1, 0), nil, 5, Succeed, "min_copies_durable", nil},
		{"be degraded", rule(BestEffort, 2, 1, "a"), []ReplicaProgress{st("a", Degraded, 0)}, 5, Succeed, "min_copies_durable", nil},
		{"be min2 behind", rule(BestEffort, 2, 2, "a"), []ReplicaProgress{in("a", 4)}, 5, Wait, "awaiting_min_copies", []string{"a"}},
		{"be min2 ok", rule(BestEffort, 2, 2, "a"), []ReplicaProgress{in("a", 5)}, 5, Succeed, "min_copies_durable", nil},
		{"be min2 degraded", rule(BestEffort, 2, 2, "a"), []ReplicaProgress{st("a", Degraded, 9)}, 5, Blocked, "below_min_copies", []string{"a"}},
		{"be min2 not member", rule(BestEffort, 2, 2), []ReplicaProgress{in("a", 9)}, 5, Blocked, "below_min_copies", nil},
		// sync_all counts the acting set only.
		{"all rf1", rule(SyncAll, 1, 1), nil, 5, Succeed, "all_durable", nil},
		{"all ok", rule(SyncAll, 3, 2, "a", "b"), []ReplicaProgress{in("a", 5), in("b", 9)}, 5, Succeed, "all_durable", nil},
		{"all behind", rule(SyncAll, 3, 2, "a", "b"), []ReplicaProgress{in("a", 4), in("b", 9)}, 5, Wait, "awaiting_barrier", []string{"a"}},
		{"all member degraded", rule(SyncAll, 3, 2, "a", "b"), []ReplicaProgress{in("a", 9), st("b", Degraded, 9)}, 5, Blocked, "replica_not_in_sync", []string{"b"}},
		{"all catching up counts not", rule(SyncAll, 2, 1, "a"), []ReplicaProgress{st("a", CatchingUp, 9)}, 5, Blocked, "replica_not_in_sync", []string{"a"}},
		{"all rebuilding", rule(SyncAll, 2, 1, "a"), []ReplicaProgress{st("a", Rebuilding, 9)}, 5, Blocked, "replica_not_in_sync", []string{"a"}},
		{"all dead replica outside set", rule(SyncAll, 3, 2, "a"), []ReplicaProgress{in("a", 5), st("b", Disconnected, 0)}, 5, Succeed, "all_durable", nil},
		{"all outside set never counts", rule(SyncAll, 3, 2), []ReplicaProgress{in("a", 9), in("b", 9)}, 5, Blocked, "below_min_copies", nil},
		{"all set empty min1", rule(SyncAll, 2, 1), []ReplicaProgress{st("a", Disconnected, 0)}, 5, Succeed, "all_durable", nil},
		{"all below min copies", rule(SyncAll, 3, 3, "a"), []ReplicaProgress{in("a", 9), in("b", 9)}, 5, Blocked, "below_min_copies", nil},
		{"all member not assigned", rule(SyncAll, 2, 1, "x"), []ReplicaProgress{in("a", 9)}, 5, Blocked, "replica_not_in_sync", []string{"x"}},
		// sync_quorum: majority of RF, counting members only, and MinCopies.
		{"quorum rf3 one down", rule(SyncQuorum, 3, 2, "a", "b"), []ReplicaProgress{in("a", 5), st("b", Disconnected, 0)}, 5, Succeed, "quorum_durable", nil},
		{"quorum rf3 one down other behind", rule(SyncQuorum, 3, 2, "a", "b"), []ReplicaProgress{in("a", 4), st("b", Disconnected, 0)}, 5, Wait, "awaiting_quorum", []string{"a"}},
		{"quorum rf3 two down", rule(SyncQuorum, 3, 2, "a", "b"), []ReplicaProgress{st("a", Degraded, 9), st("b", Disconnected, 9)}, 5, Blocked, "quorum_unreachable", []string{"a", "b"}},
		{"quorum rf3 durable non-member", rule(SyncQuorum, 3, 2, "a"), []ReplicaProgress{st("a", Degraded, 0), in("b", 9)}, 5, Blocked, "quorum_unreachable", []string{"a"}},
		{"quorum rf2 down", rule(SyncQuorum, 2, 1, "a"), []ReplicaProgress{st("a", Degraded, 9)}, 5, Blocked, "quorum_unreachable", []string{"a"}},
		{"quorum rf5 two down", rule(SyncQuorum, 5, 2, "a", "b", "c", "d"), []ReplicaProgress{in("a", 5), in("b", 7), st("c", Degraded, 0), st("d", NeedsRebuild, 0)}, 5, Succeed, "quorum_durable", nil},
		{"quorum rf5 three down", rule(SyncQuorum, 5, 2, "a", "b", "c", "d"), []ReplicaProgress{in("a", 5), st("b", Degraded, 7), st("c", Degraded, 0), st("d", NeedsRebuild, 0)}, 5, Blocked, "quorum_unreachable", []string{"b", "c", "d"}},
		{"quorum rf3 min3", rule(SyncQuorum, 3, 3, "a", "b"), []ReplicaProgress{in("a", 5), in("b", 4)}, 5, Wait, "awaiting_quorum", []string{"b"}},
		{"quorum rf3 min3 one down", rule(SyncQuorum, 3, 3, "a", "b"), []ReplicaProgress{in("a", 5), st("b", Degraded, 9)}, 5, Blocked, "below_min_copies", []string{"b"}},
	}
	for _, c := range cases {
		d := DecideFlush(c.rule, c.reps, c.lsn)
		if d.Outcome != c.want || d.Reason != c.reason || !slices.Equal(d.Missing, c.missing) {
			t.Errorf("%s: got %v %s missing %v (%s), want %v %s missing %v", c.name, d.Outcome, d.Reason, d.Missing, d.Detail, c.want, c.reason, c.missing)
		}
		if d.Outcome != Succeed && (d.Detail == "" || d.Rule == "") {
			t.Errorf("%s: no detail or rule: %+v", c.name, d)
		}
	}
	// The detail names the members and the rule.
	d := DecideFlush(rule(SyncAll, 3, 2, "a", "b"), []ReplicaProgress{in("a", 9), st("b", Degraded, 3)}, 5)
	if !strings.Contains(d.Detail, "b: degraded flushed=3") || !strings.Contains(d.Detail, "every acting-set member") || !strings.Contains(d.Detail, "[a b]") {
		t.Errorf("detail %q", d.Detail)
	}
	for _, s := range []string{"best_effort", "sync_all", "sync_quorum"} {
		d, err := ParseDurability(s)
		if err != nil || d.String() != s {
			t.Errorf("parse %s: %v %v", s, d, err)
		}
	}
	if _, err := ParseDurability("sometimes"); err == nil {
		t.Error("bad durability accepted")
	}
}

func TestCatchUpBudget(t *testing.T) {
	b := CatchUpBudget{MaxAttempts: 3, MaxDuration: time.Minute, MaxBytes: 100}
	if esc, _ := b.Verdict(2, time.Second, 10); esc {
		t.Fatal("escalated within budget")
	}
	for _, c := range []struct {
		n   int
		d   time.Duration
		by  int64
		key string
	}{{3, 0, 0, "catchup_attempts_exhausted"}, {0, 2 * time.Minute, 0, "catchup_time_budget"}, {0, 0, 101, "catchup_byte_budget"}} {
		esc, why := b.Verdict(c.n, c.d, c.by)
		if !esc || !strings.HasPrefix(why, c.key) {
			t.Errorf("%+v: %v %q", c, esc, why)
		}
	}
}

func TestRetentionBudget(t *testing.T) {
	now := time.Unix(1000, 0)
	b := RetentionBudget{MaxAge: time.Minute, MaxBytes: 1 << 20}
	if ex, _ := b.Exceeded(Hold{FromLSN: 5, Since: now.Add(-30 * time.Second), BytesAhead: 10}, now); ex {
		t.Fatal("within budget")
	}
	if ex, why := b.Exceeded(Hold{FromLSN: 5, Since: now.Add(-2 * time.Minute)}, now); !ex || !strings.Contains(why, "retention_time_budget") || !strings.Contains(why, "LSN 5") {
		t.Fatalf("time: %v %q", ex, why)
	}
	if ex, why := b.Exceeded(Hold{FromLSN: 5, BytesAhead: 2 << 20}, now); !ex || !strings.Contains(why, "retention_byte_budget") {
		t.Fatalf("bytes: %v %q", ex, why)
	}
	// An InSync replica (Since zero) is never aged out.
	if ex, _ := b.Exceeded(Hold{FromLSN: 5}, now.Add(time.Hour)); ex {
		t.Fatal("in-sync hold aged out")
	}
	// Overlapping holds: the floor is the minimum; releasing moves it.
	holds := []Hold{{ID: "a", FromLSN: 11}, {ID: "b", FromLSN: 12}}
	if f, ok := RetentionFloor(holds); !ok || f != 11 {
		t.Fatalf("floor %d %v", f, ok)
	}
	if f, ok := RetentionFloor(holds[1:]); !ok || f != 12 {
		t.Fatalf("floor after release %d %v", f, ok)
	}
	if _, ok := RetentionFloor(nil); ok {
		t.Fatal("floor without holds")
	}
}

func TestFence(t *testing.T) {
	f := Fence{Epoch: 3, Session: 7}
	if err := f.Check(3, 7); err != nil {
		t.Fatal(err)
	}
	if err := f.Check(2, 7); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("old epoch: %v", err)
	}
	if err := f.Check(2, 6); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("old epoch+session must report epoch first: %v", err)
	}
	if err := f.Check(3, 6); !errors.Is(err, ErrStaleSession) {
		t.Fatalf("old session: %v", err)
	}
}

func TestStateMachine(t *testing.T) {
	legal := [][2]ReplicaState{{Disconnected, Connecting}, {Connecting, CatchingUp}, {CatchingUp, InSync},
		{InSync, Degraded}, {Degraded, Connecting}, {Connecting, Rebuilding}, {Rebuilding, InSync}, {CatchingUp, NeedsRebuild}}
	for _, p := range legal {
		if !CanTransition(p[0], p[1]) {
			t.Errorf("%v→%v should be legal", p[0], p[1])
		}
	}
	illegal := [][2]ReplicaState{{Disconnected, InSync}, {Degraded, InSync}, {NeedsRebuild, InSync}, {NeedsRebuild, CatchingUp}}
	for _, p := range illegal {
		if CanTransition(p[0], p[1]) {
			t.Errorf("%v→%v should be illegal", p[0], p[1])
		}
	}
	for s := Disconnected; s <= Rebuilding; s++ {
		if s.CountsForBarrier() != (s == InSync) {
			t.Errorf("%v counts for barrier = %v", s, s.CountsForBarrier())
		}
	}
}

func TestActingMembers(t *testing.T) {
	want := map[string]Peer{"b": {"b", "x"}, "a": {"a", "y"}}
	cases := []struct {
		name    string
		a       Assignment
		members []string
		minc    int
	}{
		{"legacy: no set, no min_copies counts every replica", Assignment{}, []string{"a", "b"}, 1},
		{"empty set counts none", Assignment{ActingSet: []string{}, MinCopies: 1}, nil, 1},
		{"nil set with min_copies counts none", Assignment{MinCopies: 2}, nil, 2},
		{"subset, deduplicated and sorted", Assignment{ActingSet: []string{"b", "b", ""}, MinCopies: 2}, []string{"b"}, 2},
		{"member not assigned is kept (counts as disconnected)", Assignment{ActingSet: []string{"z", "a"}}, []string{"a", "z"}, 1},
	}
	for _, c := range cases {
		m, minc := actingMembers(c.a, want)
		if !slices.Equal(m, c.members) || minc != c.minc {
			t.Errorf("%s: got %v %d, want %v %d", c.name, m, minc, c.members, c.minc)
		}
	}
}

// setStateLocked refuses a move the state machine does not allow and
// keeps the replica's state.
func TestIllegalTransitionRefused(t *testing.T) {
	logs, log := newCapture()
	p := &Primary{log: log}
	p.cond = sync.NewCond(&p.mu)
	r := &replica{p: p, id: "r", state: Disconnected}
	p.mu.Lock()
	defer p.mu.Unlock()
	if r.setStateLocked(InSync, "test") || r.state != Disconnected {
		t.Fatalf("disconnected → in_sync was made: state %v", r.state)
	}
	if len(logs.find(EvIllegalTransition, map[string]string{"from": "disconnected", "to": "in_sync"})) != 1 {
		t.Fatalf("no illegal_transition event: %s", logs.tail())
	}
	if !r.setStateLocked(Connecting, "test") || !r.setStateLocked(CatchingUp, "test") || !r.setStateLocked(InSync, "test") || r.state != InSync {
		t.Fatalf("legal path refused: state %v", r.state)
	}
	if r.setStateLocked(Rebuilding, "test") || r.state != InSync {
		t.Fatalf("in_sync → rebuilding was made: state %v", r.state)
	}
}

// recordBodyHeader is what RecordBody.Encode adds to the data.
func TestRecordBodyHeaderSize(t *testing.T) {
	if n := len(RecordBody{Type: RecWrite, Data: make([]byte, 4096)}.Encode(nil)); n != recordBodyHeader+4096 || n > pooledBodyCap {
		t.Fatalf("encoded 4 KiB record body: %d bytes, header const %d, pool cap %d", n, recordBodyHeader, pooledBodyCap)
	}
}
