package master

import (
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

func codes(errs []api.Error) []string {
	var out []string
	for _, e := range errs {
		out = append(out, e.Code)
	}
	return out
}

func warnCodes(ws []api.Warning) []string {
	var out []string
	for _, w := range ws {
		out = append(out, w.Code)
	}
	return out
}

func TestResolve(t *testing.T) {
	const G = 1 << 30
	tests := []struct {
		name     string
		req      api.CreateVolumeRequest
		servers  int
		want     api.ResolvedPolicy
		errs     []string
		warnings []string
	}{
		{name: "database preset", req: api.CreateVolumeRequest{SizeBytes: G, Preset: "database"}, servers: 3,
			want: api.ResolvedPolicy{Preset: "database", SizeBytes: G, BlockSize: 4096, RF: 2, Durability: "sync_all", WALSizeBytes: LargeWALSize, MinCopies: 1}},
		{name: "general preset", req: api.CreateVolumeRequest{SizeBytes: G, Preset: "general"}, servers: 2,
			want: api.ResolvedPolicy{Preset: "general", SizeBytes: G, BlockSize: 4096, RF: 2, Durability: "best_effort", WALSizeBytes: DefaultWALSize, MinCopies: 1}},
		{name: "throughput preset", req: api.CreateVolumeRequest{SizeBytes: G, Preset: "throughput"}, servers: 2,
			want: api.ResolvedPolicy{Preset: "throughput", SizeBytes: G, BlockSize: 4096, RF: 2, Durability: "best_effort", WALSizeBytes: LargeWALSize, MinCopies: 1}},
		{name: "no preset one server", req: api.CreateVolumeRequest{SizeBytes: G}, servers: 1,
			want:     api.ResolvedPolicy{SizeBytes: G, BlockSize: 4096, RF: 1, Durability: "best_effort", WALSizeBytes: DefaultWALSize, MinCopies: 1},
			warnings: []string{"rf_defaulted"}},
		{name: "no preset three servers", req: api.CreateVolumeRequest{SizeBytes: G}, servers: 3,
			want: api.ResolvedPolicy{SizeBytes: G, BlockSize: 4096, RF: 2, Durability: "best_effort", WALSizeBytes: DefaultWALSize, MinCopies: 1}},
		{name: "override weakens database", req: api.CreateVolumeRequest{SizeBytes: G, Preset: "database", Durability: "best_effort", RF: 3}, servers: 3,
			want:     api.ResolvedPolicy{Preset: "database", SizeBytes: G, BlockSize: 4096, RF: 3, Durability: "best_effort", WALSizeBytes: LargeWALSize, MinCopies: 1},
			warnings: []string{"durability_weakened", "preset_override"}},
		{name: "smaller wal than preset", req: api.CreateVolumeRequest{SizeBytes: G, Preset: "throughput", WALSizeBytes: 8 << 20}, servers: 2,
			want:     api.ResolvedPolicy{Preset: "throughput", SizeBytes: G, BlockSize: 4096, RF: 2, Durability: "best_effort", WALSizeBytes: 8 << 20, MinCopies: 1},
			warnings: []string{"wal_smaller_than_preset"}},
		{name: "sync_all rf1", req: api.CreateVolumeRequest{SizeBytes: G, RF: 1, Durability: "sync_all"}, servers: 1,
			want:     api.ResolvedPolicy{SizeBytes: G, BlockSize: 4096, RF: 1, Durability: "sync_all", WALSizeBytes: DefaultWALSize, MinCopies: 1},
			warnings: []string{"single_copy"}},
		{name: "rf3 sync_all defaults to min_copies 2", req: api.CreateVolumeRequest{SizeBytes: G, RF: 3, Durability: "sync_all"}, servers: 3,
			want: api.ResolvedPolicy{SizeBytes: G, BlockSize: 4096, RF: 3, Durability: "sync_all", WALSizeBytes: DefaultWALSize, MinCopies: 2}},
		{name: "rf3 sync_quorum defaults to min_copies 2", req: api.CreateVolumeRequest{SizeBytes: G, RF: 3, Durability: "sync_quorum"}, servers: 3,
			want: api.ResolvedPolicy{SizeBytes: G, BlockSize: 4096, RF: 3, Durability: "sync_quorum", WALSizeBytes: DefaultWALSize, MinCopies: 2}},
		{name: "database preset at rf3 gets 2", req: api.CreateVolumeRequest{SizeBytes: G, Preset: "database", RF: 3}, servers: 3,
			want:     api.ResolvedPolicy{Preset: "database", SizeBytes: G, BlockSize: 4096, RF: 3, Durability: "sync_all", WALSizeBytes: LargeWALSize, MinCopies: 2},
			warnings: []string{"preset_override"}},
		{name: "explicit min_copies", req: api.CreateVolumeRequest{SizeBytes: G, RF: 3, Durability: "sync_all", MinCopies: 3}, servers: 3,
			want: api.ResolvedPolicy{SizeBytes: G, BlockSize: 4096, RF: 3, Durability: "sync_all", WALSizeBytes: DefaultWALSize, MinCopies: 3}},
		{name: "min_copies 2 with best_effort warns", req: api.CreateVolumeRequest{SizeBytes: G, RF: 2, MinCopies: 2}, servers: 2,
			want:     api.ResolvedPolicy{SizeBytes: G, BlockSize: 4096, RF: 2, Durability: "best_effort", WALSizeBytes: DefaultWALSize, MinCopies: 2},
			warnings: []string{"min_copies_best_effort"}},
		{name: "min_copies above rf", req: api.CreateVolumeRequest{SizeBytes: G, RF: 2, MinCopies: 3}, servers: 3, errs: []string{api.CodeBadRequest}},
		{name: "min_copies negative", req: api.CreateVolumeRequest{SizeBytes: G, RF: 2, MinCopies: -1}, servers: 3, errs: []string{api.CodeBadRequest}},
		{name: "unknown preset", req: api.CreateVolumeRequest{SizeBytes: G, Preset: "fast"}, servers: 3, errs: []string{api.CodeUnknownPreset}},
		{name: "zero size", req: api.CreateVolumeRequest{}, servers: 3, errs: []string{api.CodeBadSize}},
		{name: "negative size", req: api.CreateVolumeRequest{SizeBytes: -4096}, servers: 3, errs: []string{api.CodeBadSize}},
		{name: "unaligned size", req: api.CreateVolumeRequest{SizeBytes: G + 512}, servers: 3, errs: []string{api.CodeBadSize}},
		{name: "huge size", req: api.CreateVolumeRequest{SizeBytes: 1 << 60}, servers: 3, errs: []string{api.CodeBadSize}},
		{name: "rf beyond servers", req: api.CreateVolumeRequest{SizeBytes: G, RF: 3}, servers: 2, errs: []string{api.CodeInsufficientServers}},
		{name: "rf negative", req: api.CreateVolumeRequest{SizeBytes: G, RF: -1}, servers: 2, errs: []string{api.CodeBadRequest}},
		{name: "bad durability", req: api.CreateVolumeRequest{SizeBytes: G, Durability: "fsync"}, servers: 2, errs: []string{api.CodeBadRequest}},
		{name: "quorum needs rf3", req: api.CreateVolumeRequest{SizeBytes: G, RF: 2, Durability: "sync_quorum"}, servers: 3, errs: []string{api.CodeBadRequest}},
		{name: "bad block size", req: api.CreateVolumeRequest{SizeBytes: G, BlockSize: 3000}, servers: 3, errs: []string{api.CodeBadRequest}},
		{name: "wal far larger than the volume", req: api.CreateVolumeRequest{SizeBytes: 4096, WALSizeBytes: 1 << 40}, servers: 3, errs: []string{api.CodeBadSize}},
		{name: "wal above the maximum", req: api.CreateVolumeRequest{SizeBytes: 1 << 40, WALSizeBytes: 128 << 30}, servers: 3, errs: []string{api.CodeBadSize}},
		{name: "wal as large as a big volume is fine", req: api.CreateVolumeRequest{SizeBytes: 4 * G, WALSizeBytes: 2 * G, RF: 1}, servers: 1,
			want: api.ResolvedPolicy{SizeBytes: 4 * G, BlockSize: 4096, RF: 1, Durability: "best_effort", WALSizeBytes: 2 * G, MinCopies: 1}},
		// The preset's WAL default follows a tiny volume down (twice its
		// size, at least MinWALSize) instead of fallocating 2 GiB for it.
		{name: "large preset wal on a tiny volume follows the volume", req: api.CreateVolumeRequest{SizeBytes: 4096, Preset: "database", RF: 1}, servers: 1,
			want:     api.ResolvedPolicy{Preset: "database", SizeBytes: 4096, BlockSize: 4096, RF: 1, Durability: "sync_all", WALSizeBytes: MinWALSize, MinCopies: 1},
			warnings: []string{"preset_override", "single_copy", "no_redundancy"}},
		{name: "tiny wal", req: api.CreateVolumeRequest{SizeBytes: G, WALSizeBytes: 4096}, servers: 3, errs: []string{api.CodeBadSize}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Resolve(tc.req, tc.servers)
			if !reflect.DeepEqual(codes(got.Errors), tc.errs) {
				t.Fatalf("errors = %v (%v), want %v", codes(got.Errors), got.Errors, tc.errs)
			}
			if tc.errs != nil {
				return
			}
			if got.Policy != tc.want {
				t.Errorf("policy = %+v, want %+v", got.Policy, tc.want)
			}
			if !reflect.DeepEqual(warnCodes(got.Warnings), tc.warnings) {
				t.Errorf("warnings = %v, want %v", warnCodes(got.Warnings), tc.warnings)
			}
		})
	}
}

func TestValidateName(t *testing.T) {
	for _, n := range []string{"vol0", "a", "db-1.data_x"} {
		if e := ValidateName(n); e != nil {
			t.Errorf("%q rejected: %v", n, e)
		}
	}
	for _, n := range []string{"", ".hidden", "-x", "a/b", "a b", string(make([]byte, 65))} {
		if e := ValidateName(n); e == nil || e.Code != api.CodeBadRequest {
			t.Errorf("%q accepted", n)
		}
	}
}

func TestPlace(t *testing.T) {
	const G = 1 << 30
	tests := []struct {
		name      string
		servers   []ServerState
		rf        int
		size, wal int64
		primary   string
		replicas  []string
		err       string
		rejection map[string]string
	}{
		{name: "fewest volumes first",
			servers: []ServerState{{ID: "a", Alive: true, Volumes: 5}, {ID: "b", Alive: true, Volumes: 1}, {ID: "c", Alive: true, Volumes: 2}},
			rf:      2, size: G, primary: "b", replicas: []string{"c"}},
		{name: "tie broken by free bytes then id",
			servers: []ServerState{{ID: "a", Alive: true, FreeBytes: 10}, {ID: "b", Alive: true, FreeBytes: 20}, {ID: "c", Alive: true, FreeBytes: 20}},
			rf:      3, size: G, primary: "b", replicas: []string{"c", "a"}},
		{name: "primary spread by primaries",
			servers: []ServerState{{ID: "a", Alive: true, Volumes: 1, Primaries: 1}, {ID: "b", Alive: true, Volumes: 1}},
			rf:      2, size: G, primary: "b", replicas: []string{"a"}},
		{name: "dead and small servers rejected",
			servers: []ServerState{{ID: "a", Alive: false}, {ID: "b", Alive: true, CapacityBytes: G / 2}, {ID: "c", Alive: true}},
			rf:      1, size: G, primary: "c", replicas: []string{},
			rejection: map[string]string{"a": RejectNotAlive, "b": RejectInsufficientCapacity}},
		{name: "wal beyond free space rejected",
			servers: []ServerState{{ID: "a", Alive: true, CapacityBytes: 10 * G, FreeBytes: G}, {ID: "b", Alive: true, CapacityBytes: 10 * G, FreeBytes: 3 * G}},
			rf:      1, size: G, wal: 2 * G, primary: "b", replicas: []string{},
			rejection: map[string]string{"a": RejectInsufficientFree}},
		{name: "size plus wal beyond capacity rejected",
			servers: []ServerState{{ID: "a", Alive: true, CapacityBytes: 2 * G, FreeBytes: 2 * G}},
			rf:      1, size: 2 * G, wal: G, err: api.CodeInsufficientServers},
		{name: "not enough distinct servers",
			servers: []ServerState{{ID: "a", Alive: true}, {ID: "b", Alive: false}},
			rf:      2, size: G, err: api.CodeInsufficientServers},
		{name: "no servers", rf: 1, size: G, err: api.CodeInsufficientServers},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := Place(tc.servers, tc.rf, tc.size, tc.wal)
			if tc.err != "" {
				if p.Err == nil || p.Err.Code != tc.err {
					t.Fatalf("err = %v, want %s", p.Err, tc.err)
				}
				return
			}
			if p.Err != nil {
				t.Fatalf("unexpected error %v", p.Err)
			}
			if p.Primary != tc.primary || !reflect.DeepEqual(p.Replicas, tc.replicas) {
				t.Fatalf("got %s %v, want %s %v", p.Primary, p.Replicas, tc.primary, tc.replicas)
			}
			members := append([]string{p.Primary}, p.Replicas...)
			for i := range members {
				for j := i + 1; j < len(members); j++ {
					if members[i] == members[j] {
						t.Fatalf("server %s used twice", members[i])
					}
				}
			}
			for _, c := range p.Candidates {
				if want := tc.rejection[c.ServerID]; c.Rejection != want {
					t.Errorf("%s rejection = %q, want %q", c.ServerID, c.Rejection, want)
				}
				if c.Selected != slices.Contains(members, c.ServerID) {
					t.Errorf("%s selected = %v", c.ServerID, c.Selected)
				}
			}
			// Same state, same answer (plan and create share it).
			if q := Place(tc.servers, tc.rf, tc.size, tc.wal); !reflect.DeepEqual(p, q) {
				t.Fatalf("not deterministic: %+v vs %+v", p, q)
			}
		})
	}
}

// rep builds a candidate input that passes every gate at epoch 3.
func rep(id string, durable uint64, mod func(*CandidateInput)) CandidateInput {
	c := CandidateInput{ServerID: id, Registered: true, Heard: true, Age: 100 * time.Millisecond, InActing: true,
		Report:      &api.HeartbeatVolume{Name: "v", ID: 7, Role: api.RoleReplica, Epoch: 3, DurableLSN: durable},
		PrimaryView: &api.HeartbeatReplica{ServerID: id, State: api.StateInSync, FlushedLSN: durable}}
	if mod != nil {
		mod(&c)
	}
	return c
}

var testGates = Gates{FreshWindow: 2 * time.Second, MaxLag: 1000}

func TestEvaluateCandidates(t *testing.T) {
	tests := []struct {
		name    string
		head    uint64
		in      []CandidateInput
		best    string
		reasons map[string][]string
	}{
		{name: "highest flushed lsn wins",
			in:   []CandidateInput{rep("a", 90, nil), rep("b", 100, nil), rep("c", 95, nil)},
			best: "b"},
		{name: "tie broken by id",
			in:   []CandidateInput{rep("b", 100, nil), rep("a", 100, nil)},
			best: "a"},
		{name: "highest but stale heartbeat loses",
			in:      []CandidateInput{rep("a", 90, nil), rep("b", 100, func(c *CandidateInput) { c.Age = 5 * time.Second })},
			best:    "a",
			reasons: map[string][]string{"b": {api.ReasonHeartbeatStale}}},
		{name: "every gate",
			head: 5000,
			in: []CandidateInput{
				rep("unknown", 1, func(c *CandidateInput) { c.Registered = false; c.Heard = false; c.Report = nil; c.PrimaryView = nil }),
				rep("silent", 2, func(c *CandidateInput) { c.Heard = false; c.Report = nil; c.PrimaryView = nil }),
				rep("noreport", 3, func(c *CandidateInput) { c.Report = nil }),
				rep("primaryrole", 4900, func(c *CandidateInput) { c.Report.Role = api.RolePrimary }),
				rep("rebuilding", 4900, func(c *CandidateInput) { c.Report.Role = api.RoleRebuilding }),
				rep("needsrebuild", 4900, func(c *CandidateInput) { c.PrimaryView.State = api.StateNeedsRebuild }),
				rep("catchingup", 4900, func(c *CandidateInput) { c.PrimaryView.State = api.StateCatchingUp }),
				rep("oldepoch", 4900, func(c *CandidateInput) { c.Report.Epoch = 2 }),
				rep("lagging", 3000, nil),
				rep("otherincarnation", 4900, func(c *CandidateInput) { c.Report.ID = 6 }),
				rep("outside", 4950, func(c *CandidateInput) { c.InActing = false }),
				rep("good", 4500, nil),
			},
			best: "good",
			reasons: map[string][]string{
				"unknown":          {api.ReasonServerUnknown},
				"silent":           {api.ReasonNoHeartbeat},
				"noreport":         {api.ReasonVolumeNotReported},
				"primaryrole":      {api.ReasonWrongRole},
				"rebuilding":       {api.ReasonNeedsRebuild},
				"needsrebuild":     {api.ReasonNeedsRebuild},
				"catchingup":       {api.ReasonNotInSync},
				"oldepoch":         {api.ReasonStaleEpoch},
				"lagging":          {api.ReasonLagExceeded},
				"otherincarnation": {api.ReasonVolumeIDMismatch},
				"outside":          {api.ReasonStale},
			}},
		{name: "no primary view after master restart is fine",
			in:   []CandidateInput{rep("a", 10, func(c *CandidateInput) { c.PrimaryView = nil })},
			best: "a"},
		{name: "nobody eligible",
			in:      []CandidateInput{rep("a", 10, func(c *CandidateInput) { c.Age = time.Minute })},
			best:    "",
			reasons: map[string][]string{"a": {api.ReasonHeartbeatStale}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cands, best := EvaluateCandidates(7, 3, tc.head, tc.in, testGates)
			if best != tc.best {
				t.Errorf("best = %q, want %q (%s)", best, tc.best, summarize(cands))
			}
			if len(cands) != len(tc.in) {
				t.Fatalf("%d candidates for %d inputs", len(cands), len(tc.in))
			}
			for _, c := range cands {
				want := tc.reasons[c.ServerID]
				if want == nil {
					want = []string{}
				}
				if !reflect.DeepEqual(c.Reasons, want) {
					t.Errorf("%s reasons = %v, want %v", c.ServerID, c.Reasons, want)
				}
				if c.Eligible != (len(want) == 0) {
					t.Errorf("%s eligible = %v", c.ServerID, c.Eligible)
				}
			}
		})
	}
}

func TestPromoteDecision(t *testing.T) {
	in := []CandidateInput{
		rep("best", 100, nil),
		rep("lower", 90, nil),
		rep("lagging", 10, nil),
		rep("stale", 100, func(c *CandidateInput) { c.Age = time.Minute }),
		rep("rebuilding", 100, func(c *CandidateInput) { c.Report.Role = api.RoleRebuilding }),
	}
	cands, best := EvaluateCandidates(7, 3, 1050, in, testGates)
	if best != "best" {
		t.Fatalf("best = %s", best)
	}
	tests := []struct {
		name         string
		target       string
		force, alive bool
		chosen       string
		bypassed     []string
		rejected     bool
	}{
		{name: "auto picks best", chosen: "best"},
		{name: "explicit best", target: "best", chosen: "best"},
		{name: "lower needs force", target: "lower", rejected: true},
		{name: "lower with force", target: "lower", force: true, chosen: "lower", bypassed: []string{api.ReasonLowerFlushedLSN}},
		{name: "lagging with force", target: "lagging", force: true, chosen: "lagging", bypassed: []string{api.ReasonLagExceeded, api.ReasonLowerFlushedLSN}},
		{name: "stale heartbeat is hard", target: "stale", force: true, rejected: true},
		{name: "rebuilding is hard", target: "rebuilding", force: true, rejected: true},
		{name: "primary is hard", target: "p", force: true, rejected: true},
		{name: "stranger is hard", target: "x", force: true, rejected: true},
		{name: "alive primary needs force", alive: true, rejected: true},
		{name: "alive primary with force", alive: true, force: true, chosen: "best", bypassed: []string{api.ReasonPrimaryAlive}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chosen, bypassed, err := PromoteDecision(cands, best, "p", tc.target, tc.force, tc.alive)
			if tc.rejected {
				if err == nil || err.Code != api.CodePromoteRejected {
					t.Fatalf("want promote_rejected, got %s %v", chosen, err)
				}
				if len(err.Candidates) != len(cands) {
					t.Errorf("rejection lists %d candidates", len(err.Candidates))
				}
				return
			}
			if err != nil {
				t.Fatalf("rejected: %v", err)
			}
			if chosen != tc.chosen || !reflect.DeepEqual(bypassed, tc.bypassed) {
				t.Fatalf("got %s %v, want %s %v", chosen, bypassed, tc.chosen, tc.bypassed)
			}
		})
	}
	// No eligible candidate: auto refuses; force takes the best forceable one.
	in2 := []CandidateInput{rep("a", 50, func(c *CandidateInput) { c.Report.Epoch = 2 }), rep("b", 60, func(c *CandidateInput) { c.Age = time.Minute })}
	c2, b2 := EvaluateCandidates(7, 3, 0, in2, testGates)
	if _, _, err := PromoteDecision(c2, b2, "p", "", false, false); err == nil {
		t.Fatal("auto promote without eligible candidate accepted")
	}
	if ch, by, err := PromoteDecision(c2, b2, "p", "", true, false); err != nil || ch != "a" || !reflect.DeepEqual(by, []string{api.ReasonStaleEpoch}) {
		t.Fatalf("forced auto = %s %v %v", ch, by, err)
	}
}

func TestFailoverReplicas(t *testing.T) {
	if got := FailoverReplicas("p", []string{"a", "b"}, "a"); !reflect.DeepEqual(got, []string{"b", "p"}) {
		t.Fatalf("got %v", got)
	}
	if got := FailoverReplicas("p", []string{"a"}, "a"); !reflect.DeepEqual(got, []string{"p"}) {
		t.Fatalf("got %v", got)
	}
}

func TestFSMApply(t *testing.T) {
	s := newState()
	mk := func(name, req string) *command {
		return &command{Op: opCreate, Volume: &VolumeRecord{Name: name, SizeBytes: 1 << 20, BlockSize: 4096, Primary: "a", Replicas: []string{"b"}, RequestID: req}}
	}
	r := s.apply(mk("v", "r1"), 10)
	if r.Err != nil || r.Vol.ID != 10 || r.Vol.Epoch != 1 {
		t.Fatalf("create: %+v %v", r.Vol, r.Err)
	}
	if r := s.apply(mk("v", "r1"), 11); r.Err != nil || r.Vol.ID != 10 {
		t.Fatalf("retried create not idempotent: %+v %v", r.Vol, r.Err)
	}
	if r := s.apply(mk("v", "r2"), 12); r.Err == nil || r.Err.Code != api.CodeAlreadyExists {
		t.Fatalf("duplicate create: %v", r.Err)
	}
	if r := s.apply(&command{Op: opExpand, Name: "v", Size: 1 << 19}, 13); r.Err == nil || r.Err.Code != api.CodeBadSize {
		t.Fatalf("shrink accepted: %v", r.Err)
	}
	if r := s.apply(&command{Op: opExpand, Name: "v", Size: 2 << 20}, 14); r.Err != nil || r.Vol.SizeBytes != 2<<20 {
		t.Fatalf("expand: %v", r.Err)
	}
	if r := s.apply(&command{Op: opReassign, Name: "v", ID: 10, ExpectEpoch: 1, Primary: "b", Replicas: []string{"a"}}, 15); r.Err != nil || r.Vol.Epoch != 2 || r.Vol.Primary != "b" {
		t.Fatalf("reassign: %+v %v", r.Vol, r.Err)
	}
	// A stale timer's reassign (old epoch) is refused.
	if r := s.apply(&command{Op: opReassign, Name: "v", ID: 10, ExpectEpoch: 1, Primary: "a"}, 16); r.Err == nil || r.Err.Code != api.CodeEpochChanged {
		t.Fatalf("stale reassign: %v", r.Err)
	}
	if r := s.apply(&command{Op: opDelete, Name: "v"}, 17); r.Err != nil {
		t.Fatal(r.Err)
	}
	if id, ok := s.Tombstones["v"]; !ok || id != 10 {
		t.Fatalf("tombstone = %d %v", id, ok)
	}
	// Re-created name: new incarnation, a reassign aimed at the old one is refused.
	if r := s.apply(mk("v", "r3"), 18); r.Err != nil || r.Vol.ID != 18 {
		t.Fatal(r.Err)
	}
	if r := s.apply(&command{Op: opReassign, Name: "v", ID: 10, ExpectEpoch: 1, Primary: "b"}, 19); r.Err == nil {
		t.Fatal("reassign of old incarnation accepted")
	}
	if r := s.apply(&command{Op: "bogus"}, 20); r.Err == nil {
		t.Fatal("unknown op accepted")
	}
}

func TestEndpointChangeAllowed(t *testing.T) {
	ttl := 3 * time.Second
	for _, tc := range []struct {
		old, new string
		silent   time.Duration
		ok       bool
	}{
		{"", "127.0.0.1:1", 0, true},                   // first registration, or a cleared endpoint
		{"127.0.0.1:1", "127.0.0.1:1", 0, true},        // unchanged
		{"127.0.0.1:1", "127.0.0.1:2", 0, false},       // the owner heartbeats: forged or early
		{"127.0.0.1:1", "127.0.0.1:2", ttl - 1, false}, // not silent long enough
		{"127.0.0.1:1", "127.0.0.1:2", ttl, true},      // the old endpoint stopped for the TTL
		{"127.0.0.1:1", "127.0.0.1:2", 10 * time.Hour, true},
	} {
		if got := EndpointChangeAllowed(tc.old, tc.new, tc.silent, ttl); got != tc.ok {
			t.Errorf("%+v: %v", tc, got)
		}
	}
}

// TestPlaceOverprovision: the over-provisioning policy counts what a server
// already holds, and every refusal carries the server's reason with its
// figures (in the error and per candidate).
func TestPlaceOverprovision(t *testing.T) {
	const G = int64(1) << 30
	srv := []ServerState{{ID: "a", Alive: true, CapacityBytes: 4 * G, FreeBytes: 4 * G, ProvisionedBytes: 3 * G},
		{ID: "b", Alive: false}}
	p := PlaceWith(Policy{}, srv, 1, 2*G, 0)
	if p.Err == nil || p.Err.Code != api.CodeInsufficientServers {
		t.Fatalf("err = %v", p.Err)
	}
	for _, want := range []string{"a: insufficient_capacity: 2.0 GiB", "> 1.0 GiB free to provision", "capacity 4.0 GiB at 100% over-provisioning, 3.0 GiB provisioned", "b: not_alive"} {
		if !strings.Contains(p.Err.Message, want) {
			t.Errorf("message %q lacks %q", p.Err.Message, want)
		}
	}
	if len(p.Err.Placement) != 2 || p.Err.Placement[0].Reason == "" || p.Err.Placement[1].Rejection == "" {
		t.Fatalf("placement in the error: %+v", p.Err.Placement)
	}
	// At 200% the same server takes it (sparse volumes).
	if p := PlaceWith(Policy{OverprovisionPercent: 200}, srv, 1, 2*G, 0); p.Err != nil || p.Primary != "a" {
		t.Fatalf("at 200%%: %+v", p)
	}
	// The WAL is real space: over-provisioning does not lift the free check.
	tight := []ServerState{{ID: "a", Alive: true, CapacityBytes: 4 * G, FreeBytes: G / 2}}
	p = PlaceWith(Policy{OverprovisionPercent: 500}, tight, 1, G, G)
	if p.Err == nil || !strings.Contains(p.Err.Message, "a: insufficient_free_space: WAL 1.0 GiB (allocated up front) > 512 MiB free on disk") {
		t.Fatalf("err = %v", p.Err)
	}
	if p := PlaceWith(Policy{}, nil, 1, G, 0); p.Err == nil || !strings.Contains(p.Err.Message, "no server has registered") {
		t.Fatalf("no servers: %v", p.Err)
	}
}
