package replication

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
)

// node is one volume on one in-process server, reopenable like a process
// restart.
type node struct {
	t   *testing.T
	dir string
	vol *blockvol.Volume
}

func newNode(t *testing.T, size int64) *node {
	t.Helper()
	dir := t.TempDir()
	v, err := blockvol.Create(dir, blockvol.Options{Size: size, WALSize: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	n := &node{t: t, dir: dir, vol: v}
	t.Cleanup(func() {
		if n.vol != nil {
			n.vol.Close()
		}
	})
	return n
}

// reopen closes and reopens the volume (a process restart; recovery runs).
func (n *node) reopen() {
	n.t.Helper()
	if err := n.vol.Close(); err != nil {
		n.t.Fatal(err)
	}
	v, err := blockvol.Open(n.dir, blockvol.Options{})
	if err != nil {
		n.t.Fatal(err)
	}
	n.vol = v
}

// writers runs concurrent 4 KiB writers on dev until stop is called; it
// returns the number of writes done. Write errors fail the test.
func writers(t *testing.T, dev blockdev.Device, n int, blocks int64, flushEvery int) (stop func() int64) {
	var wg sync.WaitGroup
	var count atomic.Int64
	var halt atomic.Bool
	for g := 0; g < n; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for i := 0; !halt.Load(); i++ {
				lba := rng.Int64N(blocks)
				if err := dev.WriteAt(pattern(lba, i*16+g), lba*4096, false); err != nil {
					t.Errorf("writer %d: %v", g, err)
					return
				}
				count.Add(1)
				if flushEvery > 0 && i%flushEvery == flushEvery-1 {
					dev.Flush() // may fail while a replica is away (sync_all)
				}
				if i%64 == 0 {
					time.Sleep(time.Millisecond)
				}
			}
		}(g)
	}
	return func() int64 { halt.Store(true); wg.Wait(); return count.Load() }
}

func newTestPrimary(t *testing.T, vol *blockvol.Volume, epoch uint64, mode Durability, peers []Peer, log any, mut ...func(*PrimaryConfig)) *Primary {
	t.Helper()
	cfg := PrimaryConfig{Volume: "v1", ServerID: "srv-p", Epoch: epoch, Durability: mode, Replicas: peers, PingInterval: 100 * time.Millisecond,
		FlushWait: 300 * time.Millisecond}
	if l, ok := log.(interface{ Handler() any }); ok {
		_ = l
	}
	for _, m := range mut {
		m(&cfg)
	}
	p, err := NewPrimary(vol, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestKillReplicaUnderLoadCatchesUp(t *testing.T) {
	logs, log := newCapture()
	pn, rn := newNode(t, testVolSize), newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", InSync)

	stop := writers(t, p, 4, 1024, 16)
	waitFor(t, "some writes", func() bool { return pn.vol.HeadLSN() > 300 })
	// Kill the replica server (a process crash: connections reset, volume
	// reopened with recovery).
	rs.stop()
	waitFor(t, "replica degraded", func() bool { st, _ := replicaState(p, "srv-r"); return st.State != InSync })
	lsnAtKill := pn.vol.HeadLSN()
	rn.reopen()
	waitFor(t, "writes while the replica is down", func() bool { return pn.vol.HeadLSN() > lsnAtKill+500 })
	// sync_all: a flush now fails with EIO, never a silent success.
	if err := p.Flush(); !errors.Is(err, blockdev.ErrIO) || blockdev.Errno(err) != syscall.EIO {
		t.Fatalf("sync_all flush with the replica down: %v", err)
	}
	rs.set("v1", rn.vol, 1, "")
	rs.restart()
	waitState(t, p, "srv-r", InSync)
	n := stop()
	if err := p.Flush(); err != nil {
		t.Fatalf("flush after catch-up: %v", err)
	}
	t.Logf("%d writes, head %d", n, pn.vol.HeadLSN())
	sameData(t, pn.vol, rn.vol)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "catch_up"})
	logs.waitEvent(t, EvCatchUpDone, map[string]string{"replica": "srv-r"})
	logs.waitEvent(t, EvFlushFailed, map[string]string{"reason": "replica_not_in_sync"})
	if rn.vol.HeadLSN() != pn.vol.HeadLSN() {
		t.Fatalf("replica head %d, primary head %d", rn.vol.HeadLSN(), pn.vol.HeadLSN())
	}
}

func TestResyncMovesOnlyChangedRegions(t *testing.T) {
	logs, log := newCapture()
	const size = 64 << 20
	pn, rn := newNode(t, size), newNode(t, size)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	p := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) {
		c.Logger = log
		c.Retention = RetentionBudget{MaxAge: 300 * time.Millisecond, MaxBytes: 1 << 40}
	})
	waitState(t, p, "srv-r", InSync)
	// A first image on both sides.
	for i := int64(0); i < 256; i++ {
		if err := p.WriteAt(pattern(i*64, 1), i*64*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replica flushed", func() bool { st, _ := replicaState(p, "srv-r"); return st.FlushedLSN == pn.vol.HeadLSN() })
	rs.stop()
	waitFor(t, "replica away", func() bool { st, _ := replicaState(p, "srv-r"); return st.State != InSync })
	// Away past the retention budget: the hold is released.
	logs.waitEvent(t, EvRetentionRelease, map[string]string{"replica": "srv-r"})
	logs.waitEvent(t, EvEscalated, map[string]string{"replica": "srv-r", "to": "resync"})
	// Change 10 regions (of 1024), many times each, then recycle the WAL.
	changed := []int64{3, 17, 100, 101, 102, 500, 700, 900, 1000, 1023}
	for round := 0; round < 20; round++ {
		for _, r := range changed {
			off := r*65536 + int64(round%16)*4096
			if err := p.WriteAt(pattern(off/4096, round+2), off, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	st, _ := replicaState(p, "srv-r")
	waitFor(t, "WAL recycled past the replica", func() bool {
		if err := pn.vol.ReplCheckpoint(); err != nil {
			t.Fatal(err)
		}
		return pn.vol.OldestRetainedLSN() > st.FlushedLSN+1
	})
	before := st.BaseBytes
	rn.reopen()
	rs.set("v1", rn.vol, 1, "")
	rs.restart()
	waitState(t, p, "srv-r", InSync)
	st, _ = replicaState(p, "srv-r")
	moved := st.BaseBytes - before
	t.Logf("resync moved %d bytes for %d changed regions (volume %d bytes)", moved, len(changed), size)
	if moved <= 0 || moved > int64(len(changed))*65536 {
		t.Fatalf("resync moved %d bytes, want (0, %d]", moved, len(changed)*65536)
	}
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "resync", "reason": "gap_beyond_retention"})
	logs.waitEvent(t, EvTransferDone, map[string]string{"replica": "srv-r", "kind": "resync"})
	sameData(t, pn.vol, rn.vol)
}

func TestBlankReplicaRebuildUnderLiveWrites(t *testing.T) {
	logs, log := newCapture()
	const size = 64 << 20
	pn, rn := newNode(t, size), newNode(t, size)
	// History the WAL no longer covers.
	for i := int64(0); i < 2048; i++ {
		if err := pn.vol.WriteAt(pattern(i*7%16384, 1), (i*7%16384)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := pn.vol.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := pn.vol.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if pn.vol.OldestRetainedLSN() <= 1 {
		t.Fatalf("WAL not recycled")
	}
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	p := newTestPrimary(t, pn.vol, 1, BestEffort, nil, nil, func(c *PrimaryConfig) { c.Logger = log })
	stop := writers(t, p, 3, 16384, 0)
	waitFor(t, "live writes", func() bool { return pn.vol.HeadLSN() > 2200 })
	if err := p.Update(Assignment{Epoch: 1, Durability: BestEffort, Replicas: []Peer{{"srv-r", rs.addr}}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "rebuild started", func() bool { st, _ := replicaState(p, "srv-r"); return st.State == Rebuilding || st.State == InSync })
	waitState(t, p, "srv-r", InSync)
	n := stop()
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replica head", func() bool { return rn.vol.HeadLSN() == pn.vol.HeadLSN() })
	t.Logf("%d live writes during the rebuild", n)
	sameData(t, pn.vol, rn.vol)
	ev := logs.waitEvent(t, EvTransferDone, map[string]string{"replica": "srv-r", "kind": "rebuild"})
	if ev["achieved_lsn"].(float64) < ev["target_lsn"].(float64) {
		t.Fatalf("achieved LSN below target: %v", ev)
	}
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "rebuild", "reason": "blank"})
}

func TestRebuildResumesAfterReplicaRestart(t *testing.T) {
	logs, log := newCapture()
	old := progressEvery
	progressEvery = 1 << 20
	defer func() { progressEvery = old }()
	const size = 64 << 20
	pn, rn := newNode(t, size), newNode(t, size)
	for i := int64(0); i < size/4096; i += 3 {
		if err := pn.vol.WriteAt(pattern(i, 1), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	pn.vol.Flush()
	if err := pn.vol.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	px := newFaultProxy(t, rs.addr)
	px.delayUp.Store(int64(2 * time.Millisecond)) // slow link: the rebuild takes a while
	p := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", px.addr()}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	stop := writers(t, p, 1, size/4096, 0) // paced: the WAL hold for the resume stays within budget
	// Kill the replica once it has persisted some progress.
	stateFile := filepath.Join(rn.dir, stateFile)
	waitFor(t, "rebuild progress persisted", func() bool {
		b, err := os.ReadFile(stateFile)
		return err == nil && len(b) > 0 && !containsStr(string(b), `"progress":0`)
	})
	rs.stop()
	rn.reopen()
	rs.set("v1", rn.vol, 1, "")
	px.delayUp.Store(0)
	rs.restart()
	ev := logs.waitEvent(t, EvTransferBegun, map[string]string{"replica": "srv-r", "resume": "true"})
	if ev["progress"].(float64) <= 0 {
		t.Fatalf("resumed from 0: %v", ev)
	}
	waitState(t, p, "srv-r", InSync)
	stop()
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replica head", func() bool { return rn.vol.HeadLSN() == pn.vol.HeadLSN() })
	sameData(t, pn.vol, rn.vol)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "resume"})
	if _, err := os.Stat(stateFile); !os.IsNotExist(err) {
		t.Fatalf("transfer state left behind: %v", err)
	}
}

func containsStr(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

// The replica holds records the new primary never had: it is truncated
// (its divergent blocks restored from the new primary) and caught up.
func TestReplicaAheadIsTruncatedThenCaughtUp(t *testing.T) {
	logs, log := newCapture()
	a, b, c := newNode(t, testVolSize), newNode(t, testVolSize), newNode(t, testVolSize)
	sb := startReplServer(t, "srv-b", log)
	sc := startReplServer(t, "srv-c", log)
	sb.set("v1", b.vol, 1, "")
	sc.set("v1", c.vol, 1, "")
	pa := newTestPrimary(t, a.vol, 1, SyncQuorum, []Peer{{"srv-b", sb.addr}, {"srv-c", sc.addr}}, nil, func(cf *PrimaryConfig) { cf.Logger = log })
	waitState(t, pa, "srv-b", InSync)
	waitState(t, pa, "srv-c", InSync)
	for i := int64(0); i < 100; i++ {
		pa.WriteAt(pattern(i, 1), i*4096, false)
	}
	if err := pa.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "c flushed", func() bool { st, _ := replicaState(pa, "srv-c"); return st.FlushedLSN == a.vol.HeadLSN() })
	sc.stop() // C falls behind
	for i := int64(0); i < 200; i++ {
		pa.WriteAt(pattern(i+50, 2), (i+50)*4096, false)
	}
	if err := pa.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b flushed", func() bool { st, _ := replicaState(pa, "srv-b"); return st.FlushedLSN == a.vol.HeadLSN() })
	// A dies. C is promoted at epoch 2 (its head is 100, B's is 300).
	pa.Close()
	sb.setEpoch("v1", 2)
	pc := newTestPrimary(t, c.vol, 2, SyncAll, []Peer{{"srv-b", sb.addr}}, nil, func(cf *PrimaryConfig) { cf.Logger = log })
	waitState(t, pc, "srv-b", InSync)
	for i := int64(0); i < 20; i++ {
		if err := pc.WriteAt(pattern(i+10, 3), (i+10)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := pc.Flush(); err != nil {
		t.Fatal(err)
	}
	sameData(t, c.vol, b.vol)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-b", "plan": "truncate_then_catch_up", "reason": "replica_ahead"})
	logs.waitEvent(t, EvTruncated, map[string]string{"to": "100"})
}

func TestStaleEpochPrimaryRefused(t *testing.T) {
	logs, log := newCapture()
	pn, rn := newNode(t, testVolSize), newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", InSync)
	if err := p.WriteAt(pattern(1, 1), 4096, false); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	headBefore := rn.vol.HeadLSN()
	// The master moves the volume to epoch 2: the replica's server learns it.
	rs.setEpoch("v1", 2)
	if err := p.WriteAt(pattern(2, 1), 8192, false); err != nil {
		t.Fatal(err)
	}
	err := p.Flush()
	if !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("flush of a stale-epoch primary: %v", err)
	}
	logs.waitEvent(t, EvRefused, map[string]string{"code": CodeStaleEpoch, "side": "replica"})
	if rn.vol.HeadLSN() != headBefore {
		t.Fatalf("replica applied a record of the stale epoch: head %d → %d", headBefore, rn.vol.HeadLSN())
	}
	// Reconnects of the old primary are refused at the handshake too.
	waitFor(t, "handshake refused", func() bool {
		return len(logs.find(EvRefused, map[string]string{"side": "primary", "code": CodeStaleEpoch})) > 0
	})
	if st, _ := replicaState(p, "srv-r"); st.State == InSync {
		t.Fatal("replica InSync with a stale-epoch primary")
	}
}

// A recorded stream of an old session, replayed late, is refused once a
// newer session exists; its barrier never reaches the primary.
func TestLateOldSessionStreamRefused(t *testing.T) {
	logs, log := newCapture()
	pn, rn := newNode(t, testVolSize), newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	px := newFaultProxy(t, rs.addr)
	px.record.Store(true)
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", px.addr()}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", InSync)
	for i := int64(0); i < 10; i++ {
		p.WriteAt(pattern(i, 1), i*4096, false)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	px.record.Store(false)
	// The epoch moves on; the new primary's records follow (one Primary
	// per volume at a time: the old one goes first).
	rs.setEpoch("v1", 2)
	p.Close()
	p2 := newTestPrimary(t, pn.vol, 2, SyncAll, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) { c.Logger = log; c.Volume = "v1" })
	waitState(t, p2, "srv-r", InSync)
	head := rn.vol.HeadLSN()
	out := px.replay() // the old session's hello + records, late
	m, err := NewMsgReader(bytes.NewReader(out)).Read()
	if err != nil || m.Type != MsgError {
		t.Fatalf("late stream answered %v %v", m, err)
	}
	eb, _ := DecodeErrorBody(m.Payload)
	if eb.Code != CodeStaleEpoch {
		t.Fatalf("late stream refused with %q", eb.Code)
	}
	if rn.vol.HeadLSN() != head {
		t.Fatal("late stream changed the replica")
	}
	logs.waitEvent(t, EvRefused, map[string]string{"side": "replica", "code": CodeStaleEpoch})
}

func TestSyncAllFailsBestEffortDegrades(t *testing.T) {
	logs, log := newCapture()
	pn, rn := newNode(t, testVolSize), newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	px := newFaultProxy(t, rs.addr)
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", px.addr()}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", InSync)
	if err := p.WriteAt(pattern(1, 1), 0, true); err != nil {
		t.Fatal(err)
	}
	// The replica becomes unreachable.
	px.drop(true)
	px.cut()
	waitFor(t, "replica not in sync", func() bool { st, _ := replicaState(p, "srv-r"); return st.State != InSync })
	p.WriteAt(pattern(2, 1), 4096, false)
	err := p.Flush()
	if !errors.Is(err, blockdev.ErrIO) || blockdev.Errno(err) != syscall.EIO {
		t.Fatalf("sync_all flush with an unreachable replica: %v", err)
	}
	if err := p.WriteAt(pattern(3, 1), 8192, true); !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("sync_all FUA write with an unreachable replica: %v", err)
	}
	// Same volume, best_effort: the same flush succeeds, the replica is Degraded.
	if err := p.Update(Assignment{Epoch: 1, Durability: BestEffort, Replicas: []Peer{{"srv-r", px.addr()}}}); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatalf("best_effort flush: %v", err)
	}
	st, _ := replicaState(p, "srv-r")
	if st.State != Degraded && st.State != Connecting && st.State != Disconnected {
		t.Fatalf("replica state %v, want degraded (or reconnecting)", st.State)
	}
	logs.waitEvent(t, EvStateChanged, map[string]string{"replica": "srv-r", "from": "in_sync", "to": "degraded"})
	// Heal: back to InSync and equal.
	px.drop(false)
	waitState(t, p, "srv-r", InSync)
	if err := p.Update(Assignment{Epoch: 1, Durability: SyncAll, Replicas: []Peer{{"srv-r", px.addr()}}}); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	sameData(t, pn.vol, rn.vol)
}

func TestSyncQuorumRF3OneDown(t *testing.T) {
	_, log := newCapture()
	pn, b, c := newNode(t, testVolSize), newNode(t, testVolSize), newNode(t, testVolSize)
	sb := startReplServer(t, "srv-b", log)
	sc := startReplServer(t, "srv-c", log)
	sb.set("v1", b.vol, 1, "")
	sc.set("v1", c.vol, 1, "")
	sc.stop() // C is down from the start
	p := newTestPrimary(t, pn.vol, 1, SyncQuorum, []Peer{{"srv-b", sb.addr}, {"srv-c", sc.addr}}, nil, func(cf *PrimaryConfig) { cf.Logger = log })
	waitState(t, p, "srv-b", InSync)
	for i := int64(0); i < 50; i++ {
		p.WriteAt(pattern(i, 1), i*4096, false)
		if i%10 == 9 {
			if err := p.Flush(); err != nil {
				t.Fatalf("sync_quorum flush with 2 of 3 up: %v", err)
			}
			st, _ := replicaState(p, "srv-b")
			if st.FlushedLSN < pn.vol.HeadLSN() {
				t.Fatalf("quorum flush returned before the up replica was durable: %d < %d", st.FlushedLSN, pn.vol.HeadLSN())
			}
		}
	}
	// With B down too, no quorum: the flush fails.
	sb.stop()
	waitFor(t, "b down", func() bool { st, _ := replicaState(p, "srv-b"); return st.State != InSync })
	p.WriteAt(pattern(99, 1), 99*4096, false)
	if err := p.Flush(); !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("sync_quorum flush with 1 of 3: %v", err)
	}
}

func TestAddressChangeKeepsIdentityAndSession(t *testing.T) {
	logs, log := newCapture()
	pn, rn := newNode(t, testVolSize), newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	px1, px2 := newFaultProxy(t, rs.addr), newFaultProxy(t, rs.addr)
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", px1.addr()}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	st0 := waitState(t, p, "srv-r", InSync)
	for i := int64(0); i < 20; i++ {
		p.WriteAt(pattern(i, 1), i*4096, false)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	// The replica's address changes (same server ID).
	if err := p.Update(Assignment{Epoch: 1, Durability: SyncAll, Replicas: []Peer{{"srv-r", px2.addr()}}}); err != nil {
		t.Fatal(err)
	}
	st1, _ := replicaState(p, "srv-r")
	if st1.Session != st0.Session || st1.State != InSync || st1.Addr != px2.addr() || len(p.Replicas()) != 1 {
		t.Fatalf("address change: before %+v after %+v", st0, st1)
	}
	logs.waitEvent(t, EvEndpointMoved, map[string]string{"replica": "srv-r", "new_addr": px2.addr()})
	// The old endpoint goes away: the reconnect goes to the new address,
	// with the same identity and progress.
	px1.drop(true)
	px1.cut()
	waitFor(t, "reconnected via the new address", func() bool {
		st, _ := replicaState(p, "srv-r")
		return st.State == InSync && st.Session != st0.Session
	})
	if px2.accepted.Load() == 0 {
		t.Fatal("never connected to the new address")
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "in_sync"})
	sameData(t, pn.vol, rn.vol)

	// The old address reused by another server: it refuses data meant for srv-r.
	other := startReplServer(t, "srv-other", log)
	other.set("v1", newNode(t, testVolSize).vol, 1, "")
	if err := p.Update(Assignment{Epoch: 1, Durability: SyncAll, Replicas: []Peer{{"srv-r", other.addr}}}); err != nil {
		t.Fatal(err)
	}
	px2.cut()
	logs.waitEvent(t, EvRefused, map[string]string{"code": CodeWrongServer, "server": "srv-other"})
}

func TestMissingServerIDFailsClosed(t *testing.T) {
	logs, log := newCapture()
	pn := newNode(t, testVolSize)
	p, err := NewPrimary(pn.vol, PrimaryConfig{Volume: "v1", Epoch: 1, Durability: SyncAll, Replicas: []Peer{{ServerID: "", Addr: "127.0.0.1:1"}}, Logger: log})
	if !errors.Is(err, ErrNoServerID) || p != nil {
		t.Fatalf("missing server ID: primary %v, err %v", p, err)
	}
	logs.waitEvent(t, EvReplicaRejected, map[string]string{"reason": "missing_server_id"})
	// A live primary refuses such an entry in an update and keeps the rest.
	p = newTestPrimary(t, pn.vol, 1, SyncAll, nil, nil, func(c *PrimaryConfig) { c.Logger = log })
	if err := p.Update(Assignment{Epoch: 1, Durability: SyncAll, Replicas: []Peer{{ServerID: "", Addr: "127.0.0.1:1"}}}); !errors.Is(err, ErrNoServerID) {
		t.Fatalf("update with a missing server ID: %v", err)
	}
	if len(p.Replicas()) != 0 {
		t.Fatalf("a replica without identity was created: %+v", p.Replicas())
	}
}

// A replica whose disk is slow (barrier answers late) is waited for, not
// declared dead: there is no fixed barrier timeout.
func TestSlowReplicaIsNotDegraded(t *testing.T) {
	logs, log := newCapture()
	pn, rn := newNode(t, testVolSize), newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	px := newFaultProxy(t, rs.addr)
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", px.addr()}}, nil, func(c *PrimaryConfig) {
		c.Logger = log
		c.DeadAfter = 30 * time.Second
	})
	waitState(t, p, "srv-r", InSync)
	px.delayDown.Store(int64(1500 * time.Millisecond)) // every answer 1.5 s late: 15 ping intervals
	for i := int64(0); i < 3; i++ {
		p.WriteAt(pattern(i, 1), i*4096, false)
		if err := p.Flush(); err != nil {
			t.Fatalf("flush with a slow replica: %v", err)
		}
	}
	px.delayDown.Store(0)
	if n := len(logs.find(EvStateChanged, map[string]string{"replica": "srv-r", "from": "in_sync"})); n != 0 {
		t.Fatalf("slow replica left InSync %d times", n)
	}
}

// Catch-up that keeps failing escalates after 3 attempts, with the reason
// and LSNs in the event, and the next plan moves data instead.
func TestCatchUpEscalatesAfterThreeFailures(t *testing.T) {
	logs, log := newCapture()
	pn, rn := newNode(t, testVolSize), newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	px := newFaultProxy(t, rs.addr)
	p := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", px.addr()}}, nil, func(c *PrimaryConfig) { c.Logger = log; c.RetryMax = 50 * time.Millisecond })
	waitState(t, p, "srv-r", InSync)
	px.drop(true)
	px.cut()
	waitFor(t, "away", func() bool { st, _ := replicaState(p, "srv-r"); return st.State != InSync })
	for i := int64(0); i < 400; i++ {
		p.WriteAt(pattern(i, 1), i*4096, false)
	}
	p.Flush()
	// Every connection is cut 64 KiB into the catch-up stream.
	px.cutAfter.Store(64 << 10)
	px.drop(false)
	ev := logs.waitEvent(t, EvEscalated, map[string]string{"replica": "srv-r"})
	if why, _ := ev["reason"].(string); !containsStr(why, "catchup_attempts_exhausted") || ev["from_lsn"] == nil || ev["head_lsn"] == nil {
		t.Fatalf("escalation event %v", ev)
	}
	px.cutAfter.Store(0)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "reason": "escalated"})
	waitState(t, p, "srv-r", InSync)
	p.Flush()
	sameData(t, pn.vol, rn.vol)
}

var _ = strconv.Itoa

// Partition then heal: the old primary kept writing to B after C fell
// behind; C is promoted and writes more than B's divergent tail before B
// returns. B's head is below C's, yet its records from C's epoch start on
// are not C's: B is cut back to the fork and caught up (a plain catch-up
// from B's head would silently keep the old primary's writes).
func TestDivergedHistoryBelowPrimaryHead(t *testing.T) {
	logs, log := newCapture()
	a, b, c := newNode(t, testVolSize), newNode(t, testVolSize), newNode(t, testVolSize)
	sb := startReplServer(t, "srv-b", log)
	sc := startReplServer(t, "srv-c", log)
	sb.set("v1", b.vol, 1, "")
	sc.set("v1", c.vol, 1, "")
	pa := newTestPrimary(t, a.vol, 1, SyncQuorum, []Peer{{"srv-b", sb.addr}, {"srv-c", sc.addr}}, nil, func(cf *PrimaryConfig) { cf.Logger = log })
	waitState(t, pa, "srv-b", InSync)
	waitState(t, pa, "srv-c", InSync)
	for i := int64(0); i < 100; i++ {
		pa.WriteAt(pattern(i, 1), i*4096, false)
	}
	if err := pa.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "c flushed", func() bool { st, _ := replicaState(pa, "srv-c"); return st.FlushedLSN == a.vol.HeadLSN() })
	sc.stop()
	for i := int64(0); i < 200; i++ {
		pa.WriteAt(pattern(i+50, 2), (i+50)*4096, false) // old-epoch writes only B gets
	}
	if err := pa.Flush(); err != nil {
		t.Fatal(err)
	}
	pa.Close()
	sb.stop()
	// C is promoted (epoch 2) and writes 400 records of its own first.
	pc := newTestPrimary(t, c.vol, 2, BestEffort, []Peer{{"srv-b", sb.addr}}, nil, func(cf *PrimaryConfig) { cf.Logger = log })
	for i := int64(0); i < 400; i++ {
		if err := pc.WriteAt(pattern(i+300, 3), (i+300)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if b.vol.HeadLSN() >= c.vol.HeadLSN() {
		t.Fatalf("setup: B head %d should be below C head %d", b.vol.HeadLSN(), c.vol.HeadLSN())
	}
	b.reopen()
	sb.set("v1", b.vol, 2, "")
	sb.restart()
	if err := pc.Update(Assignment{Epoch: 2, Durability: SyncAll, Replicas: []Peer{{"srv-b", sb.addr}}}); err != nil {
		t.Fatal(err)
	}
	waitState(t, pc, "srv-b", InSync)
	if err := pc.Flush(); err != nil {
		t.Fatal(err)
	}
	sameData(t, c.vol, b.vol)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-b", "reason": "diverged_history"})
	logs.waitEvent(t, "fork_found", map[string]string{"fork_lsn": "101"})
}

// The primary side restarts in the middle of a rebuild (process restart:
// Primary closed, volume reopened, a new Primary at the same epoch): the
// replica's persisted progress is resumed, not restarted from 0.
func TestRebuildResumesAfterPrimaryRestart(t *testing.T) {
	logs, log := newCapture()
	old := progressEvery
	progressEvery = 1 << 20
	defer func() { progressEvery = old }()
	const size = 64 << 20
	pn, rn := newNode(t, size), newNode(t, size)
	if err := pn.vol.SetEpochRole(1, "primary"); err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < size/4096; i += 3 {
		if err := pn.vol.WriteAt(pattern(i, 1), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	pn.vol.Flush()
	if err := pn.vol.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	px := newFaultProxy(t, rs.addr)
	px.delayUp.Store(int64(2 * time.Millisecond))
	p := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", px.addr()}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	stateFile := filepath.Join(rn.dir, stateFile)
	var progress int64
	waitFor(t, "rebuild a quarter done", func() bool {
		b, err := os.ReadFile(stateFile)
		var st xferState
		if err != nil || json.Unmarshal(b, &st) != nil {
			return false
		}
		progress = st.Progress
		return progress >= 256 // regions of 64 KiB: 16 MiB of 64
	})
	p.Close()
	pn.reopen()
	px.delayUp.Store(0)
	p2 := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", px.addr()}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	ev := logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "resume"})
	_ = ev
	waitState(t, p2, "srv-r", InSync)
	if err := p2.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replica head", func() bool { return rn.vol.HeadLSN() == pn.vol.HeadLSN() })
	sameData(t, pn.vol, rn.vol)
	st, _ := replicaState(p2, "srv-r")
	if max := size - progress*65536 + 4<<20; st.BaseBytes > max {
		t.Fatalf("the resumed rebuild sent %d base bytes (resume point %d regions): it started over", st.BaseBytes, progress)
	}
	t.Logf("resumed at region %d, then sent %d base bytes", progress, st.BaseBytes)
}

// The dirty-region bitmap survives a primary restart: a replica that was
// away while the primary restarted and recycled its WAL is resynced with
// only the changed regions.
func TestResyncAfterPrimaryRestart(t *testing.T) {
	logs, log := newCapture()
	const size = 64 << 20
	pn, rn := newNode(t, size), newNode(t, size)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	budget := func(c *PrimaryConfig) {
		c.Logger = log
		c.Retention = RetentionBudget{MaxAge: 300 * time.Millisecond, MaxBytes: 1 << 40}
	}
	p := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", rs.addr}}, nil, budget)
	waitState(t, p, "srv-r", InSync)
	for i := int64(0); i < 512; i++ {
		p.WriteAt(pattern(i*32, 1), i*32*4096, false)
	}
	p.Flush()
	waitFor(t, "replica flushed", func() bool { st, _ := replicaState(p, "srv-r"); return st.FlushedLSN == pn.vol.HeadLSN() })
	rs.stop()
	waitFor(t, "replica away", func() bool { st, _ := replicaState(p, "srv-r"); return st.State != InSync })
	changed := []int64{5, 6, 77, 500, 1001}
	for round := 0; round < 10; round++ {
		for _, r := range changed {
			off := r*65536 + int64(round%16)*4096
			p.WriteAt(pattern(off/4096, round+2), off, false)
		}
	}
	p.Flush()
	// Primary restart (bitmap persisted at close), then its WAL is recycled.
	p.Close()
	pn.reopen()
	p2 := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", rs.addr}}, nil, budget)
	logs.waitEvent(t, "bitmap_loaded", map[string]string{"replica": "srv-r"})
	logs.waitEvent(t, EvRetentionRelease, map[string]string{"replica": "srv-r"})
	waitFor(t, "WAL recycled", func() bool {
		pn.vol.ReplCheckpoint()
		return pn.vol.OldestRetainedLSN() > 513
	})
	rn.reopen()
	rs.set("v1", rn.vol, 1, "")
	rs.restart()
	waitState(t, p2, "srv-r", InSync)
	st, _ := replicaState(p2, "srv-r")
	if st.BaseBytes <= 0 || st.BaseBytes > int64(len(changed))*65536 {
		t.Fatalf("resync after primary restart moved %d bytes, want (0, %d]", st.BaseBytes, len(changed)*65536)
	}
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "resync"})
	p2.Flush()
	sameData(t, pn.vol, rn.vol)
}
