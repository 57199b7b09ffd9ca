package replication

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
)

// Snapshot operations through the Primary: each returns once durable on
// every acting replica (sync_all), the replica holds the same snapshot
// (same ID, UUID and LSN, same bytes), deletes and restores follow, and
// authority and bad names are checked before anything changes.
func TestSnapshotOpsShippedSyncAll(t *testing.T) {
	_, log := newCapture()
	rs := startReplServer(t, "srv-b", log)
	rvol, rdir := newVol(t)
	rs.set("v1", rvol, 1, rdir)
	pvol, _ := newVol(t)
	// A long ping interval: no background barrier covers the snapshot
	// record; only the operation's own flush can.
	p, err := NewPrimary(pvol, PrimaryConfig{Volume: "v1", ServerID: testPrimaryID, Epoch: 1, Durability: SyncAll,
		Replicas: []Peer{{ServerID: "srv-b", Addr: rs.addr}}, Logger: log, PingInterval: time.Hour, FlushWait: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	waitState(t, p, "srv-b", InSync)
	for i := int64(0); i < 20; i++ {
		if err := p.WriteAt(pattern(i, 1), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	info, err := p.CreateSnapshot("s1", blockvol.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Durable on the replica when CreateSnapshot returns.
	if st, _ := replicaState(p, "srv-b"); st.FlushedLSN < info.LSN {
		t.Fatalf("replica flushed LSN %d < snapshot LSN %d when CreateSnapshot returned", st.FlushedLSN, info.LSN)
	}
	ri, err := rvol.SnapshotInfo("s1")
	if err != nil || ri.ID != info.ID || ri.UUID != info.UUID || ri.LSN != info.LSN {
		t.Fatalf("replica snapshot %+v, %v; primary %+v", ri, err, info)
	}
	// Writes after the snapshot do not show in it, on either side.
	for i := int64(0); i < 20; i += 2 {
		if err := p.WriteAt(pattern(i, 2), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	pr, err := pvol.OpenSnapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	rr, err := rvol.OpenSnapshot("s1")
	if err != nil {
		t.Fatal(err)
	}
	sameData(t, pr, rr)
	b := make([]byte, 4096)
	if err := rr.ReadAt(b, 2*4096); err != nil || string(b[:16]) != string(pattern(2, 1)[:16]) {
		t.Fatalf("replica's snapshot reads %q at block 2, %v", b[:16], err)
	}
	pr.Close()
	rr.Close()

	// Restore: when it returns every replica reads what the primary reads.
	if _, err := p.RestoreSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	sameData(t, pvol, rvol)
	if err := pvol.ReadAt(b, 2*4096); err != nil || string(b[:16]) != string(pattern(2, 1)[:16]) {
		t.Fatalf("after restore block 2 reads %q, %v", b[:16], err)
	}
	if l, _ := p.Snapshots(); len(l) != 1 || l[0].Name != "s1" {
		t.Fatalf("the snapshot does not stay after a restore: %+v", l)
	}

	// Delete follows too.
	if err := p.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := rvol.SnapshotInfo("s1"); !errors.Is(err, blockvol.ErrSnapshotNotFound) {
		t.Fatalf("replica still has s1 after DeleteSnapshot returned: %v", err)
	}

	// Bad input changes nothing.
	if _, err := p.CreateSnapshot("a@b", blockvol.SnapshotOptions{}); !errors.Is(err, blockvol.ErrSnapshotName) {
		t.Fatalf("bad name: %v", err)
	}
	if err := p.DeleteSnapshot("nope"); !errors.Is(err, blockvol.ErrSnapshotNotFound) {
		t.Fatalf("delete unknown: %v", err)
	}
	if _, err := p.RestoreSnapshot("nope"); !errors.Is(err, blockvol.ErrSnapshotNotFound) {
		t.Fatalf("restore unknown: %v", err)
	}
	if _, err := p.CreateSnapshot("s2", blockvol.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateSnapshot("s2", blockvol.SnapshotOptions{}); !errors.Is(err, blockvol.ErrSnapshotExists) {
		t.Fatalf("duplicate: %v", err)
	}
	// Without authority nothing happens on the volume.
	head := pvol.HeadLSN()
	p.cfg.WriteGate = func() error { return errors.New("lease expired") }
	if _, err := p.CreateSnapshot("s3", blockvol.SnapshotOptions{}); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("create without lease: %v", err)
	}
	if _, err := p.RestoreSnapshot("s2"); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("restore without lease: %v", err)
	}
	if err := p.DeleteSnapshot("s2"); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("delete without lease: %v", err)
	}
	if _, err := p.Snapshots(); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("list without lease: %v", err)
	}
	if pvol.HeadLSN() != head || len(pvol.Snapshots()) != 1 {
		t.Fatalf("refused operations changed the volume: head %d -> %d, snapshots %+v", head, pvol.HeadLSN(), pvol.Snapshots())
	}
	p.cfg.WriteGate = nil

	// sync_all with the replica gone: the create is not acknowledged.
	rs.stop()
	waitFor(t, "replica not in sync", func() bool { st, _ := replicaState(p, "srv-b"); return st.State != InSync })
	_, err = p.CreateSnapshot("s4", blockvol.SnapshotOptions{})
	if !errors.Is(err, blockdev.ErrIO) || !strings.Contains(err.Error(), "not durable on the replicas per sync_all") {
		t.Fatalf("create with the sync_all replica gone: %v", err)
	}
}

// TestSnapshotDuringRebuildIsAbsentOnReplica: a snapshot taken while a
// blank replica is being rebuilt cannot be made from its record there (the
// blocks not yet transferred still hold the replica's old bytes). The
// replica records it as absent, and the snapshot transfer at the end of
// the base installs it with the primary's bytes: it never holds a
// snapshot whose bytes differ. A snapshot taken once it is in sync is held.
func TestSnapshotDuringRebuildIsAbsentOnReplica(t *testing.T) {
	logs, log := newCapture()
	const size = 32 << 20
	pn, rn := newNode(t, size), newNode(t, size)
	// History the WAL no longer covers: a blank replica is rebuilt, and
	// until the transfer reaches a block it reads zeroes there.
	for i := int64(0); i < size/4096; i += 2 {
		if err := pn.vol.WriteAt(pattern(i, 1), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := pn.vol.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := pn.vol.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	px := newFaultProxy(t, rs.addr)
	px.delayUp.Store(int64(2 * time.Millisecond)) // slow link: the rebuild takes a while
	p := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", px.addr()}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", Rebuilding)
	if _, err := p.CreateSnapshot("mid", blockvol.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if st, _ := replicaState(p, "srv-r"); st.State != Rebuilding {
		t.Logf("the rebuild ended before the snapshot record reached it (state %v): nothing to check", st.State)
	}
	px.delayUp.Store(0)
	waitState(t, p, "srv-r", InSync)
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replica head", func() bool { return rn.vol.HeadLSN() == pn.vol.HeadLSN() })
	sameData(t, pn.vol, rn.vol)
	if ri, err := rn.vol.SnapshotInfo("mid"); err == nil {
		// Held: then it must read as the primary's does.
		pr, _ := pn.vol.OpenSnapshot("mid")
		rr, _ := rn.vol.OpenSnapshot("mid")
		t.Logf("replica holds %+v (installed after the base: %d)", ri, len(logs.events(EvSnapshotInstalled)))
		sameData(t, pr, rr)
		pr.Close()
		rr.Close()
	} else {
		logs.waitEvent(t, EvSnapshotSkipped, map[string]string{"reason": "base_transfer_in_progress"})
	}
	// In sync again: a new snapshot is held with the same bytes, and a
	// delete of the absent one is applied as a no-op.
	if _, err := p.CreateSnapshot("after", blockvol.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteSnapshot("mid"); err != nil {
		t.Fatal(err)
	}
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replica head", func() bool { return rn.vol.HeadLSN() == pn.vol.HeadLSN() })
	pr, err := pn.vol.OpenSnapshot("after")
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	rr, err := rn.vol.OpenSnapshot("after")
	if err != nil {
		ai, _ := pn.vol.SnapshotInfo("after")
		t.Fatalf("replica lacks the snapshot taken in sync (lsn %d): %v\nskipped: %v\ntransfers done: %v\nplans: %v\nrefused: %v\nended: %v", ai.LSN, err,
			logs.events(EvSnapshotSkipped), logs.events(EvTransferDone), logs.events(EvPlanChosen), logs.events(EvRefused), logs.events(EvSessionEnded))
	}
	defer rr.Close()
	sameData(t, pr, rr)
	if _, err := rn.vol.SnapshotInfo("mid"); err == nil {
		t.Fatal("replica still holds the deleted snapshot")
	}
}

// TestRebuildTransfersSnapshots: a blank replica rebuilt from a primary
// whose snapshots' records the WAL no longer holds gets every snapshot
// (same ID, UUID, LSN and bytes), installed after the base; later
// snapshot operations follow as records.
func TestRebuildTransfersSnapshots(t *testing.T) {
	logs, log := newCapture()
	const size = 32 << 20
	pn, rn := newNode(t, size), newNode(t, size)
	gen := 0
	writeSome := func(step int64) {
		gen++
		for i := int64(0); i < size/4096; i += step {
			if err := pn.vol.WriteAt(pattern(i, gen), i*4096, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	writeSome(3)
	for _, name := range []string{"a", "b", "c"} {
		if _, err := pn.vol.CreateSnapshot(name, blockvol.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		writeSome(5)
	}
	if err := pn.vol.DeleteSnapshot("b"); err != nil { // a gap in the chain
		t.Fatal(err)
	}
	if err := pn.vol.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := pn.vol.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if pn.vol.OldestRetainedLSN() <= 1 {
		t.Fatal("WAL not recycled: the rebuild would not be needed")
	}
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", InSync)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "rebuild"})
	want := pn.vol.Snapshots()
	got := rn.vol.Snapshots()
	if len(got) != len(want) {
		t.Fatalf("replica snapshots %+v, primary %+v", got, want)
	}
	for i := range want {
		w, g := want[i], got[i]
		if w.Name != g.Name || w.ID != g.ID || w.UUID != g.UUID || w.LSN != g.LSN || w.SizeBytes != g.SizeBytes {
			t.Fatalf("snapshot %d: replica %+v, primary %+v", i, g, w)
		}
		pr, err := pn.vol.OpenSnapshot(w.Name)
		if err != nil {
			t.Fatal(err)
		}
		rr, err := rn.vol.OpenSnapshot(w.Name)
		if err != nil {
			t.Fatal(err)
		}
		sameData(t, pr, rr)
		pr.Close()
		rr.Close()
	}
	sameData(t, pn.vol, rn.vol)
	if n := len(logs.events(EvSnapshotInstalled)); n != len(want) {
		t.Fatalf("%d snapshot_installed events, want %d", n, len(want))
	}
	// Afterwards: records as usual (sync_all: on the replica at return).
	if _, err := p.CreateSnapshot("d", blockvol.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := p.DeleteSnapshot("a"); err != nil {
		t.Fatal(err)
	}
	if l := rn.vol.Snapshots(); len(l) != 2 || l[0].Name != "c" || l[1].Name != "d" {
		t.Fatalf("replica after create d and delete a: %+v", l)
	}
}
