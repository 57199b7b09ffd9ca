package replication

import (
	"errors"
	"testing"
	"time"

	"github.com/blockd/blockd/blockvol"
)

// A volume that goes replica → primary → replica in one process keeps
// its replica-side tail floor: records above the primary's committed LSN
// (here: not yet on a replica that is away) stay in its WAL across a
// checkpoint, so a divergent tail could still be listed after a failover.
// The primary's retention holds and the replica's are separate: closing
// the Primary does not drop the replica's.
func TestReplicaPrimaryReplicaKeepsTailFloor(t *testing.T) {
	_, log := newCapture()
	clk := &clock{t: time.Unix(1_000_000, 0)}
	lease := clk.t.Add(time.Hour)
	tmpl := PrimaryConfig{PingInterval: 100 * time.Millisecond, RetryMax: 200 * time.Millisecond}
	a := startActingHost(t, "srv-a", newNode(t, testVolSize), clk, log, tmpl)
	b := startActingHost(t, "srv-b", newNode(t, testVolSize), clk, log, tmpl)
	c := startActingHost(t, "srv-c", newNode(t, testVolSize), clk, log, tmpl)
	assign := func(epoch uint64, prim *actingHost, reps ...*actingHost) *Primary {
		t.Helper()
		var peers []Peer
		for _, r := range reps {
			r.apply(Assignment{Role: RoleReplica, Epoch: epoch, PrimaryID: prim.id})
			peers = append(peers, Peer{r.id, r.addr})
		}
		prim.apply(Assignment{Role: RolePrimary, Epoch: epoch, LeaseUntil: lease, Durability: BestEffort, PrimaryID: prim.id, Replicas: peers})
		p, _ := prim.h.Primary("v1")
		for _, r := range reps {
			waitState(t, p, r.id, InSync)
		}
		return p
	}
	write := func(p *Primary, gen int) {
		t.Helper()
		for i := int64(0); i < 30; i++ {
			if err := p.WriteAt(pattern(i, gen), i*4096, false); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.Flush(); err != nil {
			t.Fatal(err)
		}
	}

	// Epoch 1: B is a replica. Epoch 2: B is the primary. Epoch 3: B is a
	// replica again.
	write(assign(1, a, b, c), 1)
	write(assign(2, b, a, c), 2)
	pa := assign(3, a, b, c)
	write(pa, 3)
	waitFor(t, "b flushed everything", func() bool { st, _ := replicaState(pa, "srv-b"); return st.FlushedLSN == a.node.vol.HeadLSN() })

	// C goes away: what A writes now is durable on A and B but not
	// committed (C is expected back), so B must keep it in its WAL.
	c.kill()
	waitFor(t, "c away", func() bool { st, _ := replicaState(pa, "srv-c"); return st.State != InSync })
	first := a.node.vol.HeadLSN() + 1
	write(pa, 4)
	head := a.node.vol.HeadLSN()
	waitFor(t, "b flushed the new records", func() bool { st, _ := replicaState(pa, "srv-b"); return st.FlushedLSN == head })
	if err := b.node.vol.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if ckpt, oldest := b.node.vol.CheckpointLSN(), b.node.vol.OldestRetainedLSN(); oldest > first {
		t.Fatalf("replica B (after replica → primary → replica) recycled its uncommitted tail: oldest retained %d > first uncommitted %d (checkpoint %d, head %d)", oldest, first, ckpt, head)
	}
	// The floor is a hold the receiver pushed to the engine, by ID.
	if l, ok := b.node.vol.RetentionHolds()[tailHoldID]; !ok || l > first {
		t.Fatalf("replica B's tail hold: %d %v, want <= %d (holds %v)", l, ok, first, b.node.vol.RetentionHolds())
	}
	// And the floor is not a leak: once C is back and has it all, the tail
	// is committed and B recycles it.
	c.restart()
	c.apply(Assignment{Role: RoleReplica, Epoch: 3, PrimaryID: "srv-a"})
	waitState(t, pa, "srv-c", InSync)
	write(pa, 5)
	waitFor(t, "b recycles the committed tail", func() bool {
		if err := b.node.vol.ReplCheckpoint(); err != nil {
			t.Fatal(err)
		}
		return b.node.vol.OldestRetainedLSN() > first
	})
	// A volume the server stops hosting leaves nothing behind in the
	// receiver: its session is closed and its tail hold released.
	write(pa, 6)
	c.kill()
	waitFor(t, "c away again", func() bool { st, _ := replicaState(pa, "srv-c"); return st.State != InSync })
	write(pa, 7)
	waitFor(t, "b holds a new tail", func() bool { _, ok := b.node.vol.RetentionHolds()[tailHoldID]; return ok })
	if err := b.h.RemoveVolume("v1"); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.node.vol.RetentionHolds()[tailHoldID]; ok {
		t.Fatalf("tail hold kept after RemoveVolume: %v", b.node.vol.RetentionHolds())
	}
	b.h.recv.mu.Lock()
	_, kept := b.h.recv.vols["v1"]
	b.h.recv.mu.Unlock()
	if kept {
		t.Fatal("the receiver still keeps the removed volume")
	}
}

// One Primary per volume: a second one is refused with a clear error
// while the first holds the volume's record feed, and accepted after it
// closed.
func TestSecondPrimaryOnVolumeRefused(t *testing.T) {
	pn := newNode(t, testVolSize)
	p := newTestPrimary(t, pn.vol, 1, BestEffort, nil, nil)
	if p2, err := NewPrimary(pn.vol, PrimaryConfig{Volume: "v1", Epoch: 1}); !errors.Is(err, blockvol.ErrFeedBusy) || p2 != nil {
		t.Fatalf("second primary on one volume: %v, %v", p2, err)
	}
	p.Close()
	p2, err := NewPrimary(pn.vol, PrimaryConfig{Volume: "v1", Epoch: 1})
	if err != nil {
		t.Fatal(err)
	}
	p2.Close()
}

// Records the feed dropped leave the bitmaps incomplete: each restarts
// after them, so a replica behind them is rebuilt rather than resynced
// from a bitmap that misses writes.
func TestFeedLossRestartsBitmaps(t *testing.T) {
	logs, log := newCapture()
	pn := newNode(t, testVolSize)
	p := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-x", "127.0.0.1:1"}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	for i := int64(0); i < 5; i++ {
		if err := p.WriteAt(pattern(i, 1), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "shipped", func() bool { p.smu.Lock(); defer p.smu.Unlock(); return p.lastLSN == 5 })
	p.feedLost(blockvol.Lost{From: 6, To: 9})
	p.smu.Lock()
	from, last := p.shipReps[0].bm.from(), p.lastLSN
	p.smu.Unlock()
	if from != 10 || last != 9 {
		t.Fatalf("after losing 6..9: bitmap from %d, last LSN %d", from, last)
	}
	logs.waitEvent(t, EvFeedLost, map[string]string{"from_lsn": "6", "to_lsn": "9"})
}
