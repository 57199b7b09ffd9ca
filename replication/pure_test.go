package replication

import (
	"errors"
	"strings"
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
		{"resume", Facts{PendingResumable: true, PendingKind: TransferRebuild, PrimaryHead: 8}, PlanResume, 0, 0, "pending_rebuild"},
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
}

func TestDurabilityTable(t *testing.T) {
	in := func(id string, f uint64) ReplicaProgress {
		return ReplicaProgress{ID: id, State: InSync, FlushedLSN: f}
	}
	st := func(id string, s ReplicaState, f uint64) ReplicaProgress {
		return ReplicaProgress{ID: id, State: s, FlushedLSN: f}
	}
	cases := []struct {
		name string
		mode Durability
		reps []ReplicaProgress
		lsn  uint64
		want Outcome
	}{
		{"be none", BestEffort, nil, 5, Succeed},
		{"be degraded", BestEffort, []ReplicaProgress{st("a", Degraded, 0)}, 5, Succeed},
		{"all rf1", SyncAll, nil, 5, Succeed},
		{"all ok", SyncAll, []ReplicaProgress{in("a", 5), in("b", 9)}, 5, Succeed},
		{"all behind", SyncAll, []ReplicaProgress{in("a", 4), in("b", 9)}, 5, Wait},
		{"all degraded", SyncAll, []ReplicaProgress{in("a", 9), st("b", Degraded, 9)}, 5, Fail},
		{"all catching up counts not", SyncAll, []ReplicaProgress{st("a", CatchingUp, 9)}, 5, Fail},
		{"all rebuilding", SyncAll, []ReplicaProgress{st("a", Rebuilding, 9)}, 5, Fail},
		{"quorum rf3 one down", SyncQuorum, []ReplicaProgress{in("a", 5), st("b", Disconnected, 0)}, 5, Succeed},
		{"quorum rf3 one down other behind", SyncQuorum, []ReplicaProgress{in("a", 4), st("b", Disconnected, 0)}, 5, Wait},
		{"quorum rf3 two down", SyncQuorum, []ReplicaProgress{st("a", Degraded, 9), st("b", Disconnected, 9)}, 5, Fail},
		{"quorum rf2 down", SyncQuorum, []ReplicaProgress{st("a", Degraded, 9)}, 5, Fail},
		{"quorum rf5 two down", SyncQuorum, []ReplicaProgress{in("a", 5), in("b", 7), st("c", Degraded, 0), st("d", NeedsRebuild, 0)}, 5, Succeed},
		{"quorum rf5 three down", SyncQuorum, []ReplicaProgress{in("a", 5), st("b", Degraded, 7), st("c", Degraded, 0), st("d", NeedsRebuild, 0)}, 5, Fail},
	}
	for _, c := range cases {
		d := DecideFlush(c.mode, c.reps, c.lsn)
		if d.Outcome != c.want {
			t.Errorf("%s: got %v (%s %v) want %v", c.name, d.Outcome, d.Reason, d.Missing, c.want)
		}
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
