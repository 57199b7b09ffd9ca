package master

import (
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// A new server taking over another's address: refused while the owner
// still heartbeats; once the owner has been silent for the lease TTL the
// old record loses the endpoint (nothing is sent to the wrong server);
// identities stay.
func TestAddressReuse(t *testing.T) {
	var logs logSink
	ttl := time.Second
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", LeaseTTL: ttl, Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	a, b := newFakeServer("a", 1, c.Addrs()), newFakeServer("b", 2, c.Addrs())
	for _, f := range []*fakeServer{a, b} {
		if _, err := f.beat(ctxT(t)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 20, RF: 2}); err != nil {
		t.Fatal(err)
	}
	// c comes up on a's endpoints while a is alive: refused.
	nc := newFakeServer("c", 3, c.Addrs())
	nc.addr, nc.nbd = a.addr, a.nbd
	if _, err := a.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := nc.beat(ctxT(t)); !api.IsCode(err, api.CodeAddressInUse) {
		t.Fatalf("c on live a's endpoint: %v", err)
	}
	// a dies; after the lease TTL c may take the endpoints.
	time.Sleep(ttl + 100*time.Millisecond)
	if _, err := nc.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if len(logs.find("address_reused", "server", "c", "previous_owner", "a")) == 0 {
		t.Fatal("no address_reused event")
	}
	info := volInfo(t, c, "v")
	for _, r := range append([]api.ReplicaInfo{{ServerID: info.Primary.ServerID, Addr: info.Primary.Addr}}, info.Replicas...) {
		if r.ServerID == "a" && r.Addr != "" {
			t.Fatalf("a still has the reused address %s", r.Addr)
		}
	}
	// b's assignment names a without an endpoint, never c's.
	resp, err := b.beat(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, as := range resp.Assignments {
		for _, r := range append([]api.ServerRef{as.Primary}, as.Replicas...) {
			if r.ServerID == "a" && (r.Addr != "" || r.NBDAddr != "") {
				t.Fatalf("assignment sends a's traffic to %s/%s", r.Addr, r.NBDAddr)
			}
		}
	}
}

// Issue 18 item 5: a forged heartbeat claiming a live server's ID with
// other endpoints is refused (and logged) and redirects neither
// GET /v1/volumes/NAME/primary nor the assignments other servers get. A
// real move (the old endpoint silent for the lease TTL) is accepted.
func TestForgedHeartbeatRefused(t *testing.T) {
	var logs logSink
	ttl := 1500 * time.Millisecond
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", LeaseTTL: ttl, HeartbeatInterval: 100 * time.Millisecond, Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	fs := map[string]*fakeServer{"local": newFakeServer("local", 1, c.Addrs()), "s2": newFakeServer("s2", 2, c.Addrs())}
	for _, f := range fs {
		f.run(100 * time.Millisecond)
	}
	defer func() {
		for _, f := range fs {
			f.stop()
		}
	}()
	waitFor(t, "servers", 20*time.Second, func() bool { ss, _ := c.Servers(ctxT(t)); return len(ss) == 2 })
	v, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "vol0", SizeBytes: 1 << 20, RF: 2})
	if err != nil {
		t.Fatal(err)
	}
	prim, repl := fs[v.Primary.ServerID], fs[v.Replicas[0].ServerID]
	waitFor(t, "healthy", 20*time.Second, func() bool { return volInfo(t, c, "vol0").Status == api.StatusHealthy })

	// The forger claims the primary's ID with its own NBD address, and the
	// replica's ID with its own control address.
	forgePrim := newFakeServer(prim.id, 9, c.Addrs())
	forgePrim.addr = prim.addr
	forgeRepl := newFakeServer(repl.id, 8, c.Addrs())
	forgeRepl.nbd = repl.nbd
	for _, f := range []*fakeServer{forgePrim, forgeRepl} {
		for i := 0; i < 3; i++ {
			if _, err := f.beat(ctxT(t)); !api.IsCode(err, api.CodeAddressInUse) {
				t.Fatalf("forged heartbeat as %s: %v", f.id, err)
			}
		}
	}
	if len(logs.find("endpoint_change_refused", "server", prim.id, "field", "nbd_addr")) == 0 ||
		len(logs.find("endpoint_change_refused", "server", repl.id, "field", "addr")) == 0 {
		t.Fatalf("refusals not logged: %v", logs.find("endpoint_change_refused"))
	}
	p, err := c.PrimaryOf(ctxT(t), "vol0")
	if err != nil || p.NBDAddr != prim.nbd || p.Addr != prim.addr {
		t.Fatalf("primary after forged heartbeats = %+v %v, want %s/%s", p, err, prim.addr, prim.nbd)
	}
	check := func(f *fakeServer) {
		t.Helper()
		resp, err := f.beat(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range resp.Assignments {
			for _, r := range append([]api.ServerRef{a.Primary}, a.Replicas...) {
				want := fs[r.ServerID]
				if r.Addr != want.addr || (r.NBDAddr != "" && r.NBDAddr != want.nbd) {
					t.Fatalf("%s's assignment sends %s's traffic to %s/%s", f.id, r.ServerID, r.Addr, r.NBDAddr)
				}
			}
		}
	}
	check(prim)
	check(repl)

	// A real move: the replica stops, stays silent for the TTL, and comes
	// back on a new control address.
	repl.stop()
	time.Sleep(ttl + 200*time.Millisecond)
	repl.addr = "127.0.0.1:21999"
	if _, err := repl.beat(ctxT(t)); err != nil {
		t.Fatalf("move after the owner was silent: %v", err)
	}
	if len(logs.find("server_address_changed", "server", repl.id, "addr", "127.0.0.1:21999")) == 0 {
		t.Fatal("no server_address_changed event")
	}
}

// Issue 18 item 6: a WAL that could never fit is refused at create with a
// one-line reason; a server's report that it cannot create an assigned
// volume marks it failed with the reason in volume info, and the mark
// clears once the server hosts it after all.
func TestVolumeFailures(t *testing.T) {
	var logs logSink
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	s1 := newFakeServer("s1", 1, c.Addrs())
	if _, err := s1.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	_, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "tiny", SizeBytes: 4096, RF: 1, WALSizeBytes: 1 << 40})
	if !api.IsCode(err, api.CodeBadSize) || !strings.Contains(err.Error(), "wal size") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("1 TiB WAL for a 4 KiB volume: %v", err)
	}
	pl, err := c.PlanVolume(ctxT(t), api.CreateVolumeRequest{Name: "big", SizeBytes: 80 << 30, RF: 1, WALSizeBytes: 30 << 30})
	if err != nil || len(pl.Errors) != 1 || pl.Errors[0].Code != api.CodeInsufficientServers || !strings.Contains(pl.Errors[0].Message, "capacity") {
		t.Fatalf("plan beyond capacity: %+v %v", pl, err)
	}

	v, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 20, RF: 1})
	if err != nil {
		t.Fatal(err)
	}
	// A failure of another incarnation, or of a volume s1 does not hold, is ignored.
	s1.failures = []api.VolumeFailure{{Volume: "v", ID: v.ID + 100, Reason: "old"}, {Volume: "nope", Reason: "x"}}
	if _, err := s1.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if i := volInfo(t, c, "v"); i.Status == api.StatusFailed {
		t.Fatalf("foreign failure accepted: %+v", i)
	}
	// The real one: no space for the WAL.
	s1.mu.Lock()
	delete(s1.vols, "v") // it could not create it, so it does not report it
	s1.failures = []api.VolumeFailure{{Volume: "v", ID: v.ID, Reason: "create wal: fallocate 67108864 bytes: no space left on device"}}
	s1.mu.Unlock()
	if _, err := s1.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	i := volInfo(t, c, "v")
	if i.Status != api.StatusFailed || !strings.Contains(i.Failure, "no space left on device") || !strings.HasPrefix(i.Failure, "s1: ") || i.FlushesOK {
		t.Fatalf("failed volume info: status %s failure %q flushes_ok %v", i.Status, i.Failure, i.FlushesOK)
	}
	if len(logs.find("volume_failed", "volume", "v", "server", "s1")) != 1 {
		t.Fatal("no volume_failed event")
	}
	// Repeated reports do not commit again.
	s1.beat(ctxT(t))
	s1.beat(ctxT(t))
	if n := len(logs.find("volume_failed", "volume", "v")); n != 1 {
		t.Fatalf("%d volume_failed events for one failure", n)
	}
	// Space was freed: the server hosts it now.
	s1.mu.Lock()
	s1.failures = nil
	s1.mu.Unlock()
	s1.beat(ctxT(t)) // re-creates it from the assignment
	if _, err := s1.beat(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	if i := volInfo(t, c, "v"); i.Status == api.StatusFailed || i.Failure != "" {
		t.Fatalf("failure not cleared: %+v", i)
	}
	if len(logs.find("volume_failure_cleared", "volume", "v")) == 0 {
		t.Fatal("no volume_failure_cleared event")
	}
}
