package master

import (
	"bytes"
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// A single-voter master restarted on the same data dir keeps every volume,
// epoch, role and server endpoint; deleted volumes stay deleted.
func TestSingleNodeRestartKeepsRegistry(t *testing.T) {
	dir := t.TempDir()
	var logs logSink
	m := startMaster(t, Config{DataDir: dir, APIAddr: "127.0.0.1:0", Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	servers := []*fakeServer{newFakeServer("s1", 1, c.Addrs()), newFakeServer("s2", 2, c.Addrs())}
	for _, s := range servers {
		if _, err := s.beat(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	ctx := ctxT(t)
	if _, err := c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "keep", SizeBytes: 1 << 30, Preset: "database"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "gone", SizeBytes: 1 << 20, RF: 1}); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteVolume(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	// A two-phase expand needs its members' heartbeats to prepare.
	for _, s := range servers {
		s.run(50 * time.Millisecond)
	}
	if _, err := c.ExpandVolume(ctx, "keep", 2<<30); err != nil {
		t.Fatal(err)
	}
	for _, s := range servers {
		s.stop()
	}
	// Promote manually (force: the primary is alive) to move the epoch.
	for _, s := range servers {
		s.beat(ctx)
		s.beat(ctx)
	}
	pr, err := c.Promote(ctx, "keep", api.PromoteRequest{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	before := volInfo(t, c, "keep")
	if before.Epoch != 2 || before.Primary.ServerID != pr.NewPrimary {
		t.Fatalf("before restart: %+v", before)
	}
	// Restore through a raft snapshot as well as the log.
	if err := m.raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "after-snap", SizeBytes: 1 << 20, RF: 1}); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteVolume(ctx, "after-snap"); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}

	// Restart on another port: the single-node raft ID is persisted.
	m2 := startMaster(t, Config{DataDir: dir, APIAddr: "127.0.0.1:0", Logger: logs.logger()})
	if err := m2.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c2 := api.NewClient([]string{m2.APIAddr()})
	vols, err := c2.ListVolumes(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 1 || vols[0].Name != "keep" {
		t.Fatalf("after restart volumes = %s", joinIDs(vols))
	}
	after := vols[0]
	if after.Epoch != before.Epoch || after.ID != before.ID || after.SizeBytes != 2<<30 || after.Durability != "sync_all" ||
		after.RF != 2 || after.Preset != "database" || after.WALSizeBytes != before.WALSizeBytes ||
		after.Primary.ServerID != before.Primary.ServerID || after.Replicas[0].ServerID != before.Replicas[0].ServerID {
		t.Fatalf("registry changed across restart:\nbefore %+v\nafter  %+v", before, after)
	}
	// Endpoints are raft state: known before any heartbeat.
	p, err := c2.PrimaryOf(ctxT(t), "keep")
	if err != nil {
		t.Fatal(err)
	}
	if p.NBDAddr == "" || p.Epoch != before.Epoch || p.ServerID != before.Primary.ServerID {
		t.Fatalf("PrimaryOf after restart = %+v", p)
	}
	// The forced promotion's lease fence survives the restart: the new
	// primary gets its role but no lease while the old one's may still run.
	if len(logs.find("lease_fence_inherited", "volume", "keep")) == 0 {
		t.Fatal("no lease_fence_inherited event")
	}
	for _, s := range servers {
		if s.id != pr.NewPrimary {
			continue
		}
		s.c = c2
		resp, err := s.beat(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range resp.Assignments {
			if a.Volume == "keep" && (a.Role != api.RolePrimary || a.LeaseTTLMS != 0) {
				t.Fatalf("new primary right after restart: %+v", a)
			}
		}
	}
	// A server still holding the deleted volume is told to drop it.
	s1 := servers[0]
	s1.c = c2
	s1.mu.Lock()
	s1.vols["gone"] = &fakeVol{HeartbeatVolume: api.HeartbeatVolume{Name: "gone", Role: api.RolePrimary, Epoch: 1}}
	s1.mu.Unlock()
	resp, err := s1.beat(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Drop) != 1 || resp.Drop[0] != "gone" {
		t.Fatalf("drop = %v", resp.Drop)
	}
	// The returning servers get their roles back at the same epoch.
	for _, a := range resp.Assignments {
		if a.Volume == "keep" && a.Epoch != before.Epoch {
			t.Fatalf("assignment epoch %d, want %d", a.Epoch, before.Epoch)
		}
	}
}

// The primary stops heartbeating: the master waits until its lease surely
// expired, promotes the replica with the highest proven FlushedLSN at
// epoch+1, and demotes the old primary when it returns.
func TestAutomaticFailover(t *testing.T) {
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
	waitFor(t, "3 live servers", 20*time.Second, func() bool {
		ss, err := c.Servers(ctxT(t))
		n := 0
		for _, s := range ss {
			if s.Alive {
				n++
			}
		}
		return err == nil && n == 3
	})
	v, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "db", SizeBytes: 1 << 30, RF: 3, Durability: "sync_all"})
	if err != nil {
		t.Fatal(err)
	}
	old := v.Primary.ServerID
	r1, r2 := v.Replicas[0].ServerID, v.Replicas[1].ServerID
	waitFor(t, "healthy volume", 20*time.Second, func() bool { return volInfo(t, c, "db").Status == api.StatusHealthy })
	for _, f := range fs {
		f.waitVol(t, "db", 1)
	}
	// The replica r2 has flushed more than r1.
	fs[old].setLSN("db", 100, 100)
	fs[r1].setLSN("db", 90, 90)
	fs[r2].setLSN("db", 100, 100)
	waitFor(t, "lsns reported", 10*time.Second, func() bool {
		pf, err := c.Preflight(ctxT(t), "db")
		return err == nil && pf.Best == r2 && pf.Candidates[0].FlushedLSN == 100 && pf.Candidates[1].FlushedLSN == 90
	})

	fs[old].stop() // kill -9, as far as the master can tell
	killedAt := time.Now()
	oldLease := fs[old].grants("db")
	lastLease := oldLease[len(oldLease)-1]
	oldLeaseEnd := lastLease.sent.Add(lastLease.ttl)

	waitFor(t, "promotion", 30*time.Second, func() bool { return volInfo(t, c, "db").Epoch == 2 })
	info := volInfo(t, c, "db")
	if info.Primary.ServerID != r2 {
		t.Fatalf("promoted %s, want %s (highest flushed LSN)", info.Primary.ServerID, r2)
	}
	if len(logs.find("lease_wait", "volume", "db", "primary", old)) == 0 ||
		len(logs.find("failover_candidate_chosen", "volume", "db", "candidate", r2)) == 0 ||
		len(logs.find("promotion", "volume", "db", "new_primary", r2, "epoch", 2, "reason", "failover")) == 0 {
		t.Fatalf("missing decision events: %v", logs.recs)
	}
	// The new primary receives a lease for epoch 2, and only after the
	// old primary's lease (from the old primary's own clock) ran out.
	waitFor(t, "new primary lease", 10*time.Second, func() bool {
		for _, g := range fs[r2].grants("db") {
			if g.epoch == 2 {
				return true
			}
		}
		return false
	})
	first := true
	for _, g := range fs[r2].grants("db") {
		if g.epoch == 2 && !g.received.After(oldLeaseEnd) {
			t.Fatalf("new primary got a lease at %v, before the old lease ended at %v", g.received, oldLeaseEnd)
		}
		if g.epoch == 2 && first {
			first = false
			// A figure, not an assertion: kill -> first write possible on the new primary.
			t.Logf("failover: kill -> new primary holds a lease after %v (lease TTL %v, heartbeat interval 100ms)", g.received.Sub(killedAt), ttl)
		}
	}
	for _, f := range []*fakeServer{fs[r1], fs[r2]} {
		waitFor(t, f.id+" at epoch 2", 10*time.Second, func() bool { fv, _ := f.vol("db"); return fv.Epoch == 2 })
	}

	// The old primary returns still claiming primary at epoch 1: demoted.
	resp, err := fs[old].beat(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	var got *api.VolumeAssignment
	for i := range resp.Assignments {
		if resp.Assignments[i].Volume == "db" {
			got = &resp.Assignments[i]
		}
	}
	if got == nil || got.Role != api.RoleReplica || got.Epoch != 2 || got.LeaseTTLMS != 0 || got.Primary.ServerID != r2 {
		t.Fatalf("returning old primary assignment = %+v", got)
	}
	info = volInfo(t, c, "db")
	if len(info.Replicas) != 2 || info.Replicas[1].ServerID != old {
		t.Fatalf("replica set after failover = %+v", info.Replicas)
	}
}

// A primary that comes back before its lease surely expired cancels the
// deferred failover: no epoch bump.
func TestReturningPrimaryCancelsFailover(t *testing.T) {
	var logs logSink
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", LeaseTTL: 4 * time.Second, HeartbeatInterval: 100 * time.Millisecond, Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	a, b := newFakeServer("a", 1, c.Addrs()), newFakeServer("b", 2, c.Addrs())
	a.run(100 * time.Millisecond)
	b.run(100 * time.Millisecond)
	defer a.stop()
	defer b.stop()
	waitFor(t, "servers", 20*time.Second, func() bool { ss, _ := c.Servers(ctxT(t)); return len(ss) == 2 })
	v, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 20, RF: 2})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "healthy", 20*time.Second, func() bool { return volInfo(t, c, "v").Status == api.StatusHealthy })
	p := a
	if v.Primary.ServerID == "b" {
		p = b
	}
	p.stop()
	waitFor(t, "lease_wait", 20*time.Second, func() bool { return len(logs.find("lease_wait", "volume", "v")) > 0 })
	if s := volInfo(t, c, "v").Status; s != api.StatusFailingOver && s != api.StatusUnavailable {
		t.Fatalf("status while waiting = %s", s)
	}
	p.run(100 * time.Millisecond)
	waitFor(t, "failover_cancelled", 20*time.Second, func() bool { return len(logs.find("failover_cancelled", "volume", "v")) > 0 })
	// Well past the original deadline, the epoch has not moved.
	time.Sleep(4500 * time.Millisecond)
	if e := volInfo(t, c, "v").Epoch; e != 1 {
		t.Fatalf("epoch = %d after the primary returned", e)
	}
}

// Preflight and manual promote: hard gates hold even with force; soft gates
// need force; the promoted primary gets no lease while the old one may
// still hold one.
func TestPreflightAndPromote(t *testing.T) {
	var logs logSink
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", LeaseTTL: 2 * time.Second, HeartbeatInterval: 100 * time.Millisecond, Logger: logs.logger()})
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
	waitFor(t, "servers", 20*time.Second, func() bool { ss, _ := c.Servers(ctxT(t)); return len(ss) == 3 })
	v, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 30, RF: 3})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "healthy", 20*time.Second, func() bool { return volInfo(t, c, "v").Status == api.StatusHealthy })
	prim, r1, r2 := v.Primary.ServerID, v.Replicas[0].ServerID, v.Replicas[1].ServerID
	for _, f := range fs {
		f.waitVol(t, "v", 1)
	}
	// Both replicas' reports reached the master before r1 goes silent.
	waitFor(t, "replica reports", 20*time.Second, func() bool {
		pf, err := c.Preflight(ctxT(t), "v")
		return err == nil && pf.Best != "" && len(pf.Candidates) == 2 && pf.Candidates[0].Eligible && pf.Candidates[1].Eligible
	})
	fs[r1].stop() // r1 goes silent: heartbeat_stale, and after the lease TTL out of the acting set
	waitFor(t, "r1 stale", 20*time.Second, func() bool {
		pf, err := c.Preflight(ctxT(t), "v")
		if err != nil {
			t.Fatal(err)
		}
		for _, cd := range pf.Candidates {
			if cd.ServerID == r1 && contains(cd.Reasons, api.ReasonStale) && contains(cd.Reasons, api.ReasonHeartbeatStale) {
				return volInfo(t, c, "v").Status == api.StatusDegraded // the shrink is confirmed: the epoch stays
			}
		}
		return false
	})
	// The live replica's next heartbeat confirms the current epoch; on a
	// loaded machine the read above can land between an epoch's change
	// and that report (stale_epoch), so wait for it rather than sample.
	var pf *api.PreflightResponse
	ok := false
	for deadline := time.Now().Add(10 * time.Second); !ok && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		pf, _ = c.Preflight(ctxT(t), "v")
		ok = pf != nil && pf.PrimaryAlive && pf.Best == r2 && len(pf.Blockers) == 1 && pf.Blockers[0] == api.ReasonPrimaryAlive
	}
	if !ok {
		t.Fatalf("preflight = %+v", pf)
	}
	epochBefore := pf.Epoch

	// Hard gate: force cannot promote the stale replica.
	_, err = c.Promote(ctxT(t), "v", api.PromoteRequest{Target: r1, Force: true})
	if !api.IsCode(err, api.CodePromoteRejected) {
		t.Fatalf("stale target with force: %v", err)
	}
	// Hard: the primary itself, and a stranger.
	if _, err = c.Promote(ctxT(t), "v", api.PromoteRequest{Target: prim, Force: true}); !api.IsCode(err, api.CodePromoteRejected) {
		t.Fatalf("primary as target: %v", err)
	}
	if _, err = c.Promote(ctxT(t), "v", api.PromoteRequest{Target: "nobody", Force: true}); !api.IsCode(err, api.CodePromoteRejected) {
		t.Fatalf("stranger as target: %v", err)
	}
	// Soft gate: the primary is alive.
	if _, err = c.Promote(ctxT(t), "v", api.PromoteRequest{Target: r2}); !api.IsCode(err, api.CodePromoteRejected) {
		t.Fatalf("alive primary without force: %v", err)
	}
	// Stale expected epoch.
	if _, err = c.Promote(ctxT(t), "v", api.PromoteRequest{Target: r2, Force: true, Epoch: epochBefore + 5}); !api.IsCode(err, api.CodeEpochChanged) {
		t.Fatalf("wrong epoch: %v", err)
	}
	if e := volInfo(t, c, "v").Epoch; e != epochBefore {
		t.Fatalf("rejected promotions moved the epoch to %d", e)
	}
	res, err := c.Promote(ctxT(t), "v", api.PromoteRequest{Target: r2, Force: true, Epoch: epochBefore})
	if err != nil {
		t.Fatal(err)
	}
	if res.NewPrimary != r2 || res.Epoch != epochBefore+1 || res.LeaseWaitMS <= 0 || len(res.Bypassed) != 1 {
		t.Fatalf("promote = %+v", res)
	}
	// Right away the new primary has the role but no lease.
	resp, err := fs[r2].beat(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range resp.Assignments {
		if a.Volume == "v" && (a.Role != api.RolePrimary || a.LeaseTTLMS != 0) {
			t.Fatalf("new primary assignment right after promote = %+v", a)
		}
	}
	waitFor(t, "lease for the new primary", 20*time.Second, func() bool {
		for _, g := range fs[r2].grants("v") {
			if g.epoch > epochBefore {
				return true
			}
		}
		return false
	})
	// No overlap: the new primary's first lease arrives after the old
	// primary's last lease (by its own clock) ended.
	var oldEnd time.Time
	for _, g := range fs[prim].grants("v") {
		if end := g.sent.Add(g.ttl); end.After(oldEnd) {
			oldEnd = end
		}
	}
	for _, g := range fs[r2].grants("v") {
		if g.epoch > epochBefore && !g.received.After(oldEnd) {
			t.Fatalf("new primary lease at %v, old primary's lease ran until %v", g.received, oldEnd)
		}
	}
	// The old primary, still alive, was demoted.
	waitFor(t, "old primary demoted", 20*time.Second, func() bool {
		fv, _ := fs[prim].vol("v")
		return fv.Role == api.RoleReplica && fv.Epoch > epochBefore
	})
	if len(logs.find("promotion", "volume", "v", "reason", "manual", "new_primary", r2)) == 0 {
		t.Fatal("no promotion event")
	}
}

// Bad input gets a 4xx JSON error with a stable code, never a crash.
func TestBadInput(t *testing.T) {
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", Logger: (&logSink{}).logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	s := newFakeServer("s1", 1, c.Addrs())
	if _, err := s.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	if _, err := c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		err  error
		code string
	}{}
	add := func(name string, err error, code string) {
		cases = append(cases, struct {
			name string
			err  error
			code string
		}{name, err, code})
	}
	_, err := c.VolumeInfo(ctx, "nope")
	add("info unknown", err, api.CodeNotFound)
	add("delete unknown", c.DeleteVolume(ctx, "nope"), api.CodeNotFound)
	_, err = c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 20})
	add("duplicate", err, api.CodeAlreadyExists)
	_, err = c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "w", SizeBytes: 1000})
	add("bad size", err, api.CodeBadSize)
	_, err = c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "w", SizeBytes: 1 << 20, RF: 3})
	add("rf > servers", err, api.CodeInsufficientServers)
	_, err = c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "w", SizeBytes: 1 << 20, Preset: "turbo"})
	add("unknown preset", err, api.CodeUnknownPreset)
	_, err = c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "../etc", SizeBytes: 1 << 20})
	add("bad name", err, api.CodeBadRequest)
	_, err = c.ExpandVolume(ctx, "v", 4096)
	add("shrink", err, api.CodeBadSize)
	_, err = c.ExpandVolume(ctx, "nope", 1<<30)
	add("expand unknown", err, api.CodeNotFound)
	_, err = c.Preflight(ctx, "nope")
	add("preflight unknown", err, api.CodeNotFound)
	_, err = c.Heartbeat(ctx, api.HeartbeatRequest{})
	add("heartbeat without id", err, api.CodeBadRequest)
	for _, tc := range cases {
		var ae *api.Error
		if !api.IsCode(tc.err, tc.code) {
			t.Errorf("%s: got %v, want code %s", tc.name, tc.err, tc.code)
		} else if ae = tc.err.(*api.Error); ae.Status < 400 || ae.Status >= 500 {
			t.Errorf("%s: status %d", tc.name, ae.Status)
		}
	}
	for _, body := range []string{"{", "[]", `{"size_bytes":"big"}`, "\x00\xff"} {
		resp, err := http.Post("http://"+m.APIAddr()+"/v1/volumes", "application/json", bytes.NewBufferString(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("body %q: status %d", body, resp.StatusCode)
		}
	}
	// Plan and resolve are dry runs: nothing is created.
	pl, err := c.PlanVolume(ctx, api.CreateVolumeRequest{Name: "dry", SizeBytes: 1 << 30, Preset: "general"})
	if err != nil {
		t.Fatal(err)
	}
	if len(pl.Errors) != 1 || pl.Errors[0].Code != api.CodeInsufficientServers {
		t.Fatalf("plan of rf2 on one server = %+v", pl)
	}
	rs, err := c.ResolveVolume(ctx, api.CreateVolumeRequest{SizeBytes: 1 << 30, Preset: "database", RF: 1})
	if err != nil || rs.Policy.Durability != "sync_all" || len(rs.Warnings) == 0 {
		t.Fatalf("resolve = %+v %v", rs, err)
	}
	if _, err := c.VolumeInfo(ctx, "dry"); !api.IsCode(err, api.CodeNotFound) {
		t.Fatalf("plan created a volume: %v", err)
	}
}

// Three masters: followers redirect to the leader; killing the leader
// during a create neither loses nor duplicates the volume; the survivors
// keep the registry and keep working.
func TestThreeMasterCluster(t *testing.T) {
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

	// A client that only knows a follower still reaches the leader.
	var follower string
	for a, m := range ms {
		if m != leader() {
			follower = a
		}
	}
	fc := api.NewClient([]string{follower})
	c := api.NewClient(apis)
	runFakeServers(t, apis, "s1", "s2", "s3")
	waitFor(t, "servers", 30*time.Second, func() bool { ss, err := fc.Servers(ctxT(t)); return err == nil && len(ss) == 3 })
	for _, n := range []string{"a", "b"} {
		if _, err := fc.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: n, SizeBytes: 1 << 30, RF: 2}); err != nil {
			t.Fatalf("create %s via follower: %v", n, err)
		}
	}

	// Kill the leader while a create is in flight.
	old := leader()
	req := api.CreateVolumeRequest{Name: "inflight", SizeBytes: 1 << 30, RF: 3, RequestID: api.NewRequestID()}
	var wg sync.WaitGroup
	var createErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		_, createErr = c.CreateVolume(ctx, req)
	}()
	time.Sleep(2 * time.Millisecond)
	old.srv.Close() // drop connections in flight, like kill -9
	old.Close()
	delete(ms, old.APIAddr())
	wg.Wait()
	t.Logf("create in flight during leader kill: err=%v", createErr)
	waitFor(t, "a new leader", 30*time.Second, func() bool { return leader() != nil })
	if createErr != nil {
		// The caller retries with the same request ID: exactly-once either way.
		if _, err := c.CreateVolume(ctxT(t), req); err != nil {
			t.Fatalf("retry of in-flight create: %v", err)
		}
	}
	// A second retry of the same request is a no-op, not a duplicate or an error.
	if _, err := c.CreateVolume(ctxT(t), req); err != nil {
		t.Fatalf("repeat of the same create: %v", err)
	}
	vols, err := c.ListVolumes(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := joinIDs(vols); got != "a,b,inflight" {
		t.Fatalf("volumes after leader kill = %s", got)
	}
	// Every surviving master's FSM holds exactly the same registry.
	waitFor(t, "replicated registry", 20*time.Second, func() bool {
		for _, m := range ms {
			if len(m.fsm.volumes()) != 3 {
				return false
			}
		}
		return true
	})
	// And the survivors keep working: create, heartbeats, assignments.
	if _, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "after", SizeBytes: 1 << 30, RF: 2}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "assignments after leader change", 30*time.Second, func() bool {
		i, err := c.VolumeInfo(ctxT(t), "after")
		return err == nil && i.Status == api.StatusHealthy
	})
}

// Masters added with --join: a single voter on TCP grows to three; the
// cluster survives the loss of the first one.
func TestJoin(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster in -short")
	}
	var logs logSink
	first := freePort(t)
	ms := []*Master{startMaster(t, Config{DataDir: t.TempDir(), APIAddr: first, RaftAddr: freePort(t), Logger: logs.logger()})}
	if err := ms[0].WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		ms = append(ms, startMaster(t, Config{DataDir: t.TempDir(), APIAddr: freePort(t), RaftAddr: freePort(t), Join: first, Logger: logs.logger()}))
	}
	c := api.NewClient([]string{ms[0].APIAddr(), ms[1].APIAddr(), ms[2].APIAddr()})
	waitFor(t, "three voters", 30*time.Second, func() bool {
		v, nv := voterIDs(members(t, ms[0]))
		return len(v) == 3 && len(nv) == 0
	})
	f := newFakeServer("s1", 1, c.Addrs())
	f.run(200 * time.Millisecond)
	defer f.stop()
	waitFor(t, "server", 20*time.Second, func() bool { ss, err := c.Servers(ctxT(t)); return err == nil && len(ss) == 1 })
	if _, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "j", SizeBytes: 1 << 20, RF: 1}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replicated to the joiners", 20*time.Second, func() bool {
		return ms[1].fsm.volume("j") != nil && ms[2].fsm.volume("j") != nil
	})
	ms[0].srv.Close()
	ms[0].Close()
	waitFor(t, "a new leader", 30*time.Second, func() bool { return ms[1].IsLeader() || ms[2].IsLeader() })
	if _, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "k", SizeBytes: 1 << 20, RF: 1}); err != nil {
		t.Fatal(err)
	}
	vols, err := c.ListVolumes(ctxT(t))
	if err != nil || joinIDs(vols) != "j,k" {
		t.Fatalf("volumes %s, %v", joinIDs(vols), err)
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	api1 := freePort(t)
	for name, cfg := range map[string]Config{
		"no data dir":     {APIAddr: "127.0.0.1:0"},
		"malformed peer":  {DataDir: t.TempDir(), APIAddr: api1, RaftAddr: freePort(t), Peers: []string{"garbage"}},
		"self not listed": {DataDir: t.TempDir(), APIAddr: api1, RaftAddr: freePort(t), Peers: []string{"127.0.0.1:1=127.0.0.1:2"}},
		"peers w/o raft":  {DataDir: t.TempDir(), APIAddr: api1, Peers: []string{api1 + "=127.0.0.1:2"}},
	} {
		cfg.Logger = (&logSink{}).logger()
		m, err := Start(cfg)
		if err == nil {
			m.Close()
			t.Errorf("%s: accepted", name)
		}
	}
	// The port is free again: a rejected start leaks no listener.
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: api1, Logger: (&logSink{}).logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}
