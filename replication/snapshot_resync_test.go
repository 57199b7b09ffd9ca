package replication

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/blockd/blockd/blockvol"
)

// sameSnapshots checks that replica lists exactly primary's snapshots
// (name, ID, UUID, LSN, size) and that each reads the same bytes on both.
func sameSnapshots(t *testing.T, pvol, rvol *blockvol.Volume) {
	t.Helper()
	want, got := pvol.Snapshots(), rvol.Snapshots()
	if len(got) != len(want) {
		t.Fatalf("replica snapshots %v, primary %v", snapNames(got), snapNames(want))
	}
	for i := range want {
		w, g := want[i], got[i]
		if w.Name != g.Name || w.ID != g.ID || w.UUID != g.UUID || w.LSN != g.LSN || w.SizeBytes != g.SizeBytes {
			t.Fatalf("snapshot %d: replica %+v, primary %+v", i, g, w)
		}
		pr, err := pvol.OpenSnapshot(w.Name)
		if err != nil {
			t.Fatal(err)
		}
		rr, err := rvol.OpenSnapshot(w.Name)
		if err != nil {
			pr.Close()
			t.Fatal(err)
		}
		sameData(t, pr, rr)
		pr.Close()
		rr.Close()
	}
}

func snapNames(l []blockvol.SnapshotInfo) []string {
	out := make([]string, 0, len(l))
	for _, in := range l {
		out = append(out, in.Name)
	}
	return out
}

// awayPastRetention takes the replica server down and waits until the
// primary has given up its WAL hold for it (so it will be resynced).
func awayPastRetention(t *testing.T, p *Primary, rs *replServer, logs *logCapture) {
	t.Helper()
	rs.stop()
	waitFor(t, "replica away", func() bool { st, _ := replicaState(p, "srv-r"); return st.State != InSync })
	logs.waitEvent(t, EvRetentionRelease, map[string]string{"replica": "srv-r"})
}

// recycleWAL checkpoints the primary until its WAL no longer holds the
// replica's next record.
func recycleWAL(t *testing.T, p *Primary, pvol *blockvol.Volume) {
	t.Helper()
	st, _ := replicaState(p, "srv-r")
	waitFor(t, "WAL recycled past the replica", func() bool {
		if err := pvol.ReplCheckpoint(); err != nil {
			t.Fatal(err)
		}
		return pvol.OldestRetainedLSN() > st.FlushedLSN+1
	})
}

// TestResyncBringsSnapshots: a replica away past the WAL's retention,
// while the primary took snapshots A and B (with writes around them) and
// deleted Z, is resynced: it drops Z, gets A and B, and afterwards lists
// exactly the primary's snapshots, each reading the same bytes. A second
// gap with only a delete keeps what the replica holds and drops the one
// deleted. (Before the snapshot plan, a resynced replica kept Z and
// lacked A and B.)
func TestResyncBringsSnapshots(t *testing.T) {
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
	gen := 0
	write := func(step int64) {
		t.Helper()
		gen++
		for i := int64(0); i < 2048; i += step {
			if err := p.WriteAt(pattern(i*8, gen), i*8*4096, false); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	snap := func(name string) {
		t.Helper()
		if _, err := p.CreateSnapshot(name, blockvol.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	write(1)
	snap("z")
	write(3)
	snap("x")
	write(5)
	waitFor(t, "replica flushed", func() bool { st, _ := replicaState(p, "srv-r"); return st.FlushedLSN == pn.vol.HeadLSN() })
	sameSnapshots(t, pn.vol, rn.vol)

	awayPastRetention(t, p, rs, logs)
	snap("a")
	write(7)
	snap("b")
	write(2)
	if err := p.DeleteSnapshot("z"); err != nil {
		t.Fatal(err)
	}
	write(11)
	recycleWAL(t, p, pn.vol)
	rn.reopen()
	rs.set("v1", rn.vol, 1, "")
	rs.restart()
	waitState(t, p, "srv-r", InSync)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "resync"})
	logs.waitEvent(t, EvSnapshotSyncPlanned, map[string]string{"replica": "srv-r", "kind": "resync", "reason": SnapSyncNoneKept,
		"keep": "0", "drop": "2", "send": "3"})
	waitFor(t, "replica head", func() bool { return rn.vol.HeadLSN() == pn.vol.HeadLSN() })
	sameData(t, pn.vol, rn.vol)
	sameSnapshots(t, pn.vol, rn.vol)
	if got := snapNames(rn.vol.Snapshots()); len(got) != 3 || got[0] != "x" || got[1] != "a" || got[2] != "b" {
		t.Fatalf("replica snapshots %v, want [x a b]", got)
	}

	// A second gap with only a delete: the replica keeps x, a and b and
	// drops a; nothing is sent.
	awayPastRetention(t, p, rs, logs)
	if err := p.DeleteSnapshot("a"); err != nil {
		t.Fatal(err)
	}
	write(13)
	recycleWAL(t, p, pn.vol)
	rs.restart()
	waitState(t, p, "srv-r", InSync)
	logs.waitEvent(t, EvSnapshotSyncPlanned, map[string]string{"replica": "srv-r", "kind": "resync", "reason": SnapSyncNewestKept,
		"keep": "2", "drop": "1", "send": "0"})
	waitFor(t, "replica head", func() bool { return rn.vol.HeadLSN() == pn.vol.HeadLSN() })
	sameSnapshots(t, pn.vol, rn.vol)
	sameData(t, pn.vol, rn.vol)

	// In sync: records as usual.
	snap("c")
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	// The head moves when the record is appended, the list once the
	// snapshot is committed.
	waitFor(t, "replica snapshot c", func() bool { _, err := rn.vol.SnapshotInfo("c"); return err == nil })
	sameSnapshots(t, pn.vol, rn.vol)
}

// TestRebuildReplacesStaleSnapshots: a replica that still holds
// snapshots (one the primary deleted meanwhile, one the primary still
// has, one of its own the primary never had) is rebuilt: it drops them
// all, gets the primary's, and lists exactly the primary's snapshots with
// the same bytes. (Before the snapshot plan it skipped installing the
// primary's and kept its own.)
func TestRebuildReplacesStaleSnapshots(t *testing.T) {
	logs, log := newCapture()
	const size = 32 << 20
	pn, rn := newNode(t, size), newNode(t, size)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", InSync)
	gen := 0
	write := func(step int64) {
		t.Helper()
		gen++
		for i := int64(0); i < size/4096; i += step {
			if err := pn.vol.WriteAt(pattern(i, gen), i*4096, false); err != nil {
				t.Fatal(err)
			}
		}
		if err := pn.vol.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	write(3)
	for _, name := range []string{"z", "x"} {
		if _, err := p.CreateSnapshot(name, blockvol.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		write(5)
	}
	sameSnapshots(t, pn.vol, rn.vol)
	rs.stop()
	waitFor(t, "replica away", func() bool { st, _ := replicaState(p, "srv-r"); return st.State != InSync })
	p.Close()
	// While it is away: the primary deletes z and takes a and b; the
	// replica gets a snapshot of its own, and its transfer state is torn
	// (its image is not trusted: it is rebuilt).
	if err := pn.vol.DeleteSnapshot("z"); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b"} {
		write(7)
		if _, err := pn.vol.CreateSnapshot(name, blockvol.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	write(2)
	if err := rn.vol.WriteAt(pattern(5, 99), 5*4096, false); err != nil {
		t.Fatal(err)
	}
	if _, err := rn.vol.CreateSnapshot("own", blockvol.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rn.dir, stateFile), []byte(`{"session":`), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := snapNames(rn.vol.Snapshots()); len(got) != 3 {
		t.Fatalf("replica before the rebuild holds %v", got)
	}
	rs.restart()
	p = newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", InSync)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r", "plan": "rebuild", "reason": "untrusted"})
	logs.waitEvent(t, EvSnapshotSyncPlanned, map[string]string{"replica": "srv-r", "kind": "rebuild", "reason": SnapSyncNoneKept,
		"keep": "0", "drop": "3", "send": "3"})
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	sameData(t, pn.vol, rn.vol)
	sameSnapshots(t, pn.vol, rn.vol)
	if n := len(logs.events(EvSnapshotInstSkip)); n != 0 {
		t.Fatalf("%d snapshot installs skipped: %v", n, logs.events(EvSnapshotInstSkip))
	}
}
