package replication

import (
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func startHost(t *testing.T, id string, clk *clock, log *slog.Logger) (*Host, string) {
	cfg := HostConfig{ServerID: id, Now: clk.now, Logger: log, Primary: PrimaryConfig{PingInterval: 100 * time.Millisecond}}
	h := NewHost(cfg)
	ln := mustListen(t)
	go h.Serve(ln)
	t.Cleanup(func() { h.Close() })
	return h, ln.Addr().String()
}

// The assignment interface end to end: primary with a lease, lease expiry,
// failover to the replica at a new epoch, the old primary demoted to a
// replica and brought back in sync by the new one.
func TestHostAssignmentsAndFailover(t *testing.T) {
	clk := &clock{t: time.Unix(1_000_000, 0)}
	a, b := newNode(t, testVolSize), newNode(t, testVolSize)
	ha, addrA := startHost(t, "srv-a", clk, nil)
	hb, addrB := startHost(t, "srv-b", clk, nil)
	ha.AddVolume("v1", a.vol)
	hb.AddVolume("v1", b.vol)
	lease := clk.t.Add(10 * time.Second)
	if err := hb.Apply(Assignment{Volume: "v1", Role: RoleReplica, Epoch: 1, PrimaryID: "srv-a"}); err != nil {
		t.Fatal(err)
	}
	if err := ha.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 1, PrimaryID: "srv-a", LeaseUntil: lease, Durability: SyncAll, Replicas: []Peer{{"srv-b", addrB}}}); err != nil {
		t.Fatal(err)
	}
	pa, _ := ha.Primary("v1")
	waitState(t, pa, "srv-b", InSync)
	dev, ok := ha.Device("v1")
	if !ok {
		t.Fatal("no device for the primary")
	}
	for i := int64(0); i < 50; i++ {
		if err := dev.WriteAt(pattern(i, 1), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, ok := hb.Device("v1"); ok {
		t.Fatal("a replica exported a writable device")
	}
	// The lease runs out: writes and flushes are refused with ErrNotPrimary.
	clk.t = lease
	if err := dev.WriteAt(pattern(1, 2), 4096, false); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("write after lease expiry: %v", err)
	}
	if err := dev.Flush(); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("flush after lease expiry: %v", err)
	}
	// Reads too: a deposed primary must not answer with data a newer
	// primary may already have overwritten.
	if err := dev.ReadAt(make([]byte, 4096), 0); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("read after lease expiry: %v", err)
	}
	if _, err := dev.BlockStatus(0, 4096); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("block status after lease expiry: %v", err)
	}
	// A stale assignment is refused.
	if err := hb.Apply(Assignment{Volume: "v1", Role: RoleReplica, Epoch: 0}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("stale assignment: %v", err)
	}
	// Failover: B becomes primary at epoch 2, A its replica.
	lease2 := clk.t.Add(10 * time.Second)
	if err := ha.Apply(Assignment{Volume: "v1", Role: RoleReplica, Epoch: 2, PrimaryID: "srv-b"}); err != nil {
		t.Fatal(err)
	}
	if err := hb.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 2, PrimaryID: "srv-b", LeaseUntil: lease2, Durability: SyncAll, Replicas: []Peer{{"srv-a", addrA}}}); err != nil {
		t.Fatal(err)
	}
	if b.vol.Epoch() != 2 || b.vol.Role() != string(RolePrimary) || a.vol.Epoch() != 2 || a.vol.Role() != string(RoleReplica) {
		t.Fatalf("persisted epoch/role: a %d/%s b %d/%s", a.vol.Epoch(), a.vol.Role(), b.vol.Epoch(), b.vol.Role())
	}
	pb, _ := hb.Primary("v1")
	waitState(t, pb, "srv-a", InSync)
	devB, _ := hb.Device("v1")
	for i := int64(0); i < 20; i++ {
		if err := devB.WriteAt(pattern(i, 3), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := devB.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, ok := ha.Device("v1"); ok {
		t.Fatal("demoted primary still exports a device")
	}
	sameData(t, b.vol, a.vol)
	st := hb.Status()
	if len(st) != 1 || st[0].Role != RolePrimary || st[0].Epoch != 2 || len(st[0].Replicas) != 1 || st[0].Replicas[0].State != InSync {
		t.Fatalf("status %+v", st)
	}
}
