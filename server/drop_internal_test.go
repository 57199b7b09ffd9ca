package server

import (
	"log/slog"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/vfs"
)

// TestDropDoesNotHoldHeartbeats: a deleted volume's removal (close, then
// its files) runs beside the heartbeat loop, not in it, because the next
// heartbeat renews every other volume's lease. Here removing the files
// takes 1.5 s; the heartbeat reply that drops the volume is applied at
// once, the volume is gone from the reports and from serving at once, an
// assignment of the same name waits until the removal is done, and then
// creates a fresh volume. On the old code apply returned only after the
// removal (the directory was already gone).
func TestDropDoesNotHoldHeartbeats(t *testing.T) {
	efs := vfs.NewErrorFS(vfs.NewCrashFS(), 1)
	efs.AddRule(vfs.Rule{Ops: []vfs.Op{vfs.OpRemoveAll}, Path: "v", Latency: 1500 * time.Millisecond})
	logs := &syncBuf{}
	log := slog.New(slog.NewJSONHandler(logs, nil))
	clk := time.Now()
	host := replication.NewHost(replication.HostConfig{ServerID: "local", Logger: log})
	defer host.Close()
	s := &Server{cfg: Config{ServerID: "local", DataDir: "/data", FS: efs, AdvertiseAddr: "127.0.0.1:1", AdvertiseNBD: "127.0.0.1:2"},
		log: log, host: host, vols: map[string]*hosted{}}
	defer func() {
		s.dropWG.Wait()
		for _, h := range s.vols {
			h.close()
		}
	}()
	assign := func(name string, id uint64) api.VolumeAssignment {
		return api.VolumeAssignment{Volume: name, ID: id, SizeBytes: 1 << 20, BlockSize: 4096, WALSizeBytes: 1 << 20,
			Durability: "best_effort", Role: api.RoleReplica, Epoch: 1, Primary: api.ServerRef{ServerID: "p"}}
	}
	v, w := assign("v", 1), assign("w", 2)
	s.apply(&api.HeartbeatResponse{Assignments: []api.VolumeAssignment{v, w}}, clk)
	if n := len(host.Status()); n != 2 {
		t.Fatalf("%d volumes hosted, want 2", n)
	}

	began := time.Now()
	s.apply(&api.HeartbeatResponse{Assignments: []api.VolumeAssignment{w}, Drop: []string{"v"}}, clk)
	took := time.Since(began)
	if _, err := efs.Stat("/data/volumes/v"); err != nil {
		t.Fatalf("the heartbeat reply that dropped v was applied only after v's files were removed (%v): %v", took, err)
	}
	t.Logf("the reply that drops v applied in %v; v's files are still being removed", took)
	if st := host.Status(); len(st) != 1 || st[0].Volume != "w" {
		t.Fatalf("host status while v is removed: %+v", st)
	}
	for _, hv := range s.report().Volumes {
		if hv.Name == "v" {
			t.Fatalf("v reported while it is being removed: %+v", hv)
		}
	}
	// v assigned again (a new volume of the same name) while the old one's
	// files are still going: not created on top of them.
	v2 := assign("v", 3)
	s.apply(&api.HeartbeatResponse{Assignments: []api.VolumeAssignment{v2, w}}, clk)
	s.mu.Lock()
	_, hosted := s.vols["v"]
	s.mu.Unlock()
	if hosted {
		t.Fatal("v created again while the deleted v's files were being removed")
	}

	s.dropWG.Wait()
	if _, err := efs.Stat("/data/volumes/v"); err == nil {
		t.Fatal("v's directory still there after its removal finished")
	}
	if ev := logs.events("volume_dropped"); len(ev) != 1 || ev[0]["volume"] != "v" {
		t.Fatalf("volume_dropped events: %v", ev)
	}
	s.apply(&api.HeartbeatResponse{Assignments: []api.VolumeAssignment{v2, w}}, clk)
	s.mu.Lock()
	h := s.vols["v"]
	s.mu.Unlock()
	if h == nil || h.id != 3 {
		t.Fatalf("v not created fresh after the removal: %+v", h)
	}
	if f := s.report().Failures; len(f) != 0 {
		t.Fatalf("failures reported for a wait on a removal: %+v", f)
	}
}
