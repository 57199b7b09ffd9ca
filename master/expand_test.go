package master

import (
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

var expandPol = ExpandPolicy{Timeout: 10 * time.Second, SilentLimit: 2 * time.Second}

func expandIntent(start time.Time) *ExpandRecord {
	return &ExpandRecord{ID: 40, FromBytes: 1 << 30, SizeBytes: 2 << 30, Phase: api.ExpandPreparing,
		Members: []string{"s1", "s2", "s3"}, StartedUnixMS: start.UnixMilli()}
}

func prepared(id uint64, size int64) *api.HeartbeatVolume {
	return &api.HeartbeatVolume{Name: "v", ID: 7, SizeBytes: 1 << 30, PendingSizeBytes: size, ExpandID: id}
}

func TestDecideExpand(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	e := expandIntent(t0)
	ok := func(id string) ExpandMember {
		return ExpandMember{ServerID: id, SilentFor: 100 * time.Millisecond, Report: prepared(40, 2<<30)}
	}
	idle := func(id string) ExpandMember {
		return ExpandMember{ServerID: id, SilentFor: 100 * time.Millisecond, Report: &api.HeartbeatVolume{Name: "v", ID: 7, SizeBytes: 1 << 30}}
	}
	cases := []struct {
		name    string
		members []ExpandMember
		now     time.Time
		want    ExpandAction
		server  string
		cause   string
	}{
		{"all prepared", []ExpandMember{ok("s1"), ok("s2"), ok("s3")}, t0.Add(time.Second), ExpandCommit, "", ""},
		{"one still preparing", []ExpandMember{ok("s1"), idle("s2"), ok("s3")}, t0.Add(time.Second), ExpandWait, "", ""},
		{"one failed", []ExpandMember{ok("s1"), {ServerID: "s2", Report: &api.HeartbeatVolume{ID: 7, ExpandID: 40, ExpandError: "no space left on device"}}, ok("s3")},
			t0.Add(time.Second), ExpandCancel, "s2", ExpandCausePrepareFailed},
		{"timeout", []ExpandMember{ok("s1"), ok("s2"), idle("s3")}, t0.Add(11 * time.Second), ExpandCancel, "s3", ExpandCauseTimeout},
		{"silent member", []ExpandMember{ok("s1"), ok("s2"), {ServerID: "s3", SilentFor: 3 * time.Second}}, t0.Add(time.Second), ExpandCancel, "s3", ExpandCauseSilent},
		// A silent member that prepared before it went quiet does not
		// block the commit: its prepared state is durable.
		{"prepared then silent", []ExpandMember{ok("s1"), ok("s2"), {ServerID: "s3", SilentFor: 3 * time.Second, Report: prepared(40, 2<<30)}}, t0.Add(time.Second), ExpandCommit, "", ""},
		// Stale reports: a prepared size of an older (cancelled) expand of
		// the same size, another incarnation's report, or another size.
		{"stale expand id", []ExpandMember{ok("s1"), {ServerID: "s2", Report: prepared(31, 2<<30)}, ok("s3")}, t0.Add(time.Second), ExpandWait, "", ""},
		{"stale expand id times out", []ExpandMember{ok("s1"), {ServerID: "s2", Report: prepared(31, 2<<30)}, ok("s3")}, t0.Add(11 * time.Second), ExpandCancel, "s2", ExpandCauseTimeout},
		{"old incarnation", []ExpandMember{ok("s1"), {ServerID: "s2", Report: &api.HeartbeatVolume{ID: 3, ExpandID: 40, PendingSizeBytes: 2 << 30}}, ok("s3")}, t0.Add(time.Second), ExpandWait, "", ""},
		{"old incarnation's failure ignored", []ExpandMember{ok("s1"), {ServerID: "s2", Report: &api.HeartbeatVolume{ID: 3, ExpandID: 40, ExpandError: "boom"}}, ok("s3")}, t0.Add(time.Second), ExpandWait, "", ""},
		{"other size", []ExpandMember{ok("s1"), {ServerID: "s2", Report: prepared(40, 3<<30)}, ok("s3")}, t0.Add(time.Second), ExpandWait, "", ""},
		{"an old failure ignored", []ExpandMember{ok("s1"), {ServerID: "s2", Report: &api.HeartbeatVolume{ID: 7, ExpandID: 31, ExpandError: "boom"}}, ok("s3")}, t0.Add(time.Second), ExpandWait, "", ""},
		{"no report yet", []ExpandMember{ok("s1"), ok("s2"), {ServerID: "s3"}}, t0.Add(time.Second), ExpandWait, "", ""},
		{"never reported, timed out", []ExpandMember{ok("s1"), ok("s2"), {ServerID: "s3"}}, t0.Add(11 * time.Second), ExpandCancel, "s3", ExpandCauseTimeout},
		// A server that is not a member does not count either way.
		{"non-member", []ExpandMember{ok("s1"), ok("s2"), ok("s3"), {ServerID: "s4", Report: &api.HeartbeatVolume{ID: 7, ExpandID: 40, ExpandError: "boom"}}}, t0.Add(time.Second), ExpandCommit, "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := DecideExpand(e, 7, c.members, c.now, expandPol)
			if d.Action != c.want || d.Server != c.server || d.Cause != c.cause {
				t.Fatalf("decision %s server %q cause %q (%s), want %s %q %q", d.Action, d.Server, d.Cause, d.Reason, c.want, c.server, c.cause)
			}
			if d.Action == ExpandCancel && !strings.Contains(d.Reason, "server "+c.server) {
				t.Fatalf("the reason does not name the server: %q", d.Reason)
			}
		})
	}
}

// The registry's side: intent, commit, cancel, and the compare-and-set on
// the expand ID that keeps a late decision from closing a newer expand.
func TestExpandFSM(t *testing.T) {
	s := newState()
	if r := s.apply(&command{Op: opCreate, Volume: &VolumeRecord{Name: "v", SizeBytes: 1 << 20, BlockSize: 4096, RF: 3,
		Primary: "s1", Replicas: []string{"s2", "s3"}}}, 5); r.Err != nil {
		t.Fatal(r.Err)
	}
	prep := func(size int64, idx uint64) *applyResult {
		return s.apply(&command{Op: opExpandPrepare, Name: "v", Expand: &ExpandRecord{SizeBytes: size, Members: []string{"s1", "s2", "s3"}}}, idx)
	}
	for _, c := range []struct {
		size int64
		code string
	}{{1 << 19, api.CodeBadSize}, {1<<20 + 512, api.CodeBadSize}} {
		if r := prep(c.size, 6); r.Err == nil || r.Err.Code != c.code {
			t.Fatalf("prepare %d: %v, want %s", c.size, r.Err, c.code)
		}
	}
	if r := prep(1<<20, 6); r.Err != nil || r.Vol.Expand != nil {
		t.Fatalf("prepare to the current size: %v %+v", r.Err, r.Vol.Expand)
	}
	r := prep(2<<20, 7)
	if r.Err != nil || r.Vol.SizeBytes != 1<<20 || r.Vol.preparing() == nil || r.Vol.Expand.ID != 7 {
		t.Fatalf("prepare: %v %+v", r.Err, r.Vol)
	}
	if r := prep(2<<20, 8); r.Err != nil || r.Vol.Expand.ID != 7 {
		t.Fatalf("a retry does not join the expand in progress: %v %+v", r.Err, r.Vol.Expand)
	}
	if r := prep(3<<20, 9); r.Err == nil || r.Err.Code != api.CodeExpandBusy {
		t.Fatalf("a second expand while one prepares: %v", r.Err)
	}
	if r := s.apply(&command{Op: opExpandCommit, Name: "v", ID: 6}, 10); r.Err == nil || r.Err.Code != api.CodeEpochChanged {
		t.Fatalf("commit of another expand ID: %v", r.Err)
	}
	if r := s.apply(&command{Op: opExpandCancel, Name: "v", ID: 7, Failure: &VolumeFailureRecord{Server: "s3", Reason: "server s3 did not prepare"}}, 11); r.Err != nil ||
		r.Vol.SizeBytes != 1<<20 || r.Vol.Expand.Phase != api.ExpandCancelled || r.Vol.Expand.Server != "s3" {
		t.Fatalf("cancel: %v %+v", r.Err, r.Vol)
	}
	if r := s.apply(&command{Op: opExpandCommit, Name: "v", ID: 7}, 12); r.Err == nil {
		t.Fatal("a commit after the cancel was applied")
	}
	r = prep(2<<20, 13)
	if r.Err != nil || r.Vol.Expand.ID != 13 {
		t.Fatalf("prepare after a cancel: %v %+v", r.Err, r.Vol.Expand)
	}
	if r := s.apply(&command{Op: opExpandCancel, Name: "v", ID: 7}, 14); r.Err == nil {
		t.Fatal("a late cancel of the old expand closed the new one")
	}
	if r := s.apply(&command{Op: opExpandCommit, Name: "v", ID: 13}, 15); r.Err != nil || r.Vol.SizeBytes != 2<<20 || r.Vol.Expand.Phase != api.ExpandCommitted {
		t.Fatalf("commit: %v %+v", r.Err, r.Vol)
	}
	// The clone is deep: changing a copy changes nothing in the registry.
	c := s.Volumes["v"].clone()
	c.Expand.Members[0] = "x"
	if s.Volumes["v"].Expand.Members[0] != "s1" {
		t.Fatal("clone shares the expand's members")
	}
}
