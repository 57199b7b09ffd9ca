package replication

import (
	"encoding/json"
	"strings"
	"syscall"
	"testing"

	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/vfs"
)

// TestRebuildSyncFailureEndsTheSession: the replica persists its rebuild
// progress in the background (persistAsync) while base data keeps
// arriving. When the extent's sync fails, the session ends with that
// error and the state file records no progress past what was synced;
// once the disk is healthy again the rebuild completes.
func TestRebuildSyncFailureEndsTheSession(t *testing.T) {
	logs, log := newCapture()
	old := progressEvery
	progressEvery = 1 << 20
	defer func() { progressEvery = old }()
	const size = 16 << 20
	pn := newNode(t, size)
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
	cfs := vfs.NewCrashFS()
	rv, err := blockvol.Create("/r", blockvol.Options{Size: size, WALSize: 1 << 20, FS: cfs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rv.Close() })
	// The first extent sync is the transfer's head reset (ReplResetHead);
	// the next is the first resume point's.
	cfs.Inject(vfs.Fault{Op: vfs.OpSync, Name: blockvol.ExtentFile, Skip: 1, Err: syscall.EIO})
	rs := startReplServer(t, "srv-r", log)
	rs.mu.Lock()
	rs.vols["v1"] = ReplicaTarget{Vol: rv, Epoch: 1, Dir: "/r", FS: cfs, PrimaryID: testPrimaryID}
	rs.mu.Unlock()
	p := newTestPrimary(t, pn.vol, 1, BestEffort, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	defer func() {
		if t.Failed() {
			logs.mu.Lock()
			t.Log(logs.buf.String())
			logs.mu.Unlock()
		}
	}()
	waitFor(t, "a session ended by the failed sync", func() bool {
		for _, ev := range logs.events(EvSessionEnded) {
			if r, _ := ev["reason"].(string); strings.Contains(r, "sync base") {
				return true
			}
		}
		return false
	})
	if b, err := vfs.ReadFile(cfs, "/r/"+stateFile); err != nil {
		t.Fatalf("no transfer state while the rebuild is unfinished: %v", err)
	} else {
		var st xferState
		if err := json.Unmarshal(b, &st); err != nil {
			t.Fatal(err)
		}
		if st.Progress != 0 {
			t.Fatalf("progress %d recorded although no base sync succeeded", st.Progress)
		}
	}
	if st, _ := replicaState(p, "srv-r"); st.State == InSync {
		t.Fatal("replica in sync although its base data was never synced")
	}
	cfs.ClearFaults()
	waitState(t, p, "srv-r", InSync)
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	sameData(t, pn.vol, rv)
}
