package server

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/vfs"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *syncBuf) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// events counts the JSON log lines whose msg is name.
func (w *syncBuf) events(name string) []map[string]any {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(w.b.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == name {
			out = append(out, m)
		}
	}
	return out
}

// Issue 18 item 6: a server that cannot create an assigned volume (here
// fallocate of its WAL fails with ENOSPC, then a WAL size the engine
// refuses) reports it in every heartbeat's Failures with the reason,
// retries slowly instead of at every heartbeat, logs each distinct
// reason once, and reports nothing once the volume exists.
func TestCreateFailureReported(t *testing.T) {
	cfs := vfs.NewCrashFS()
	logs := &syncBuf{}
	log := slog.New(slog.NewJSONHandler(logs, nil))
	clk := time.Unix(1_000_000, 0)
	host := replication.NewHost(replication.HostConfig{ServerID: "local", Logger: log})
	defer host.Close()
	s := &Server{cfg: Config{ServerID: "local", DataDir: "/data", FS: cfs, AdvertiseAddr: "127.0.0.1:1", AdvertiseNBD: "127.0.0.1:2"},
		log: log, host: host, vols: map[string]*hosted{}}
	s.fails.now = func() time.Time { return clk }
	defer func() {
		for _, h := range s.vols {
			h.close()
		}
	}()
	a := api.VolumeAssignment{Volume: "v", ID: 7, SizeBytes: 1 << 20, BlockSize: 4096, WALSizeBytes: 1 << 20,
		Durability: "best_effort", Role: api.RoleReplica, Epoch: 1, Primary: api.ServerRef{ServerID: "p"}}
	resp := &api.HeartbeatResponse{Assignments: []api.VolumeAssignment{a}}

	cfs.Inject(vfs.Fault{Op: vfs.OpAllocate, Err: syscall.ENOSPC})
	s.apply(resp, clk)
	f := s.report().Failures
	if len(f) != 1 || f[0].Volume != "v" || f[0].ID != 7 || !strings.Contains(f[0].Reason, "no space left on device") {
		t.Fatalf("failures after an ENOSPC create: %+v", f)
	}
	// Heartbeats within the retry pause: no new attempt, no new log line,
	// still reported.
	ops := cfs.Ops()
	for i := 0; i < 10; i++ {
		s.apply(resp, clk)
	}
	if cfs.Ops() != ops {
		t.Fatalf("create retried at every heartbeat (%d file operations)", cfs.Ops()-ops)
	}
	if n := len(s.report().Failures); n != 1 {
		t.Fatalf("%d failures reported during the pause", n)
	}
	// After the pause it retries; the same reason is not logged again.
	clk = clk.Add(failRetryMax)
	s.apply(resp, clk)
	if cfs.Ops() == ops {
		t.Fatal("no retry after the pause")
	}
	if ev := logs.events("volume_create_failed"); len(ev) != 1 {
		t.Fatalf("%d volume_create_failed events for one reason, want 1", len(ev))
	}
	if ev := logs.events("assignment_failed"); len(ev) != 0 {
		t.Fatalf("create failure also logged as assignment_failed: %v", ev)
	}
	// A different reason (a WAL smaller than the engine accepts) is
	// logged and reported.
	cfs.ClearFaults()
	resp.Assignments[0].WALSizeBytes = 4096
	clk = clk.Add(failRetryMax)
	s.apply(resp, clk)
	f = s.report().Failures
	if len(f) != 1 || strings.Contains(f[0].Reason, "no space") || !strings.Contains(f[0].Reason, "invalid") {
		t.Fatalf("failures after a bad WAL size: %+v", f)
	}
	if ev := logs.events("volume_create_failed"); len(ev) != 2 {
		t.Fatalf("%d volume_create_failed events for two reasons, want 2", len(ev))
	}
	// Fixed: created, nothing reported.
	resp.Assignments[0].WALSizeBytes = 1 << 20
	clk = clk.Add(failRetryMax)
	s.apply(resp, clk)
	if f := s.report().Failures; len(f) != 0 {
		t.Fatalf("failures after a successful create: %+v", f)
	}
	if st := host.Status(); len(st) != 1 || st[0].Volume != "v" || st[0].Role != replication.RoleReplica {
		t.Fatalf("host status after create: %+v", st)
	}
	// A volume the master stops assigning is no longer reported.
	cfs.Inject(vfs.Fault{Op: vfs.OpAllocate, Err: syscall.ENOSPC})
	b := a
	b.Volume, b.ID = "w", 8
	s.apply(&api.HeartbeatResponse{Assignments: []api.VolumeAssignment{a, b}}, clk)
	if f := s.report().Failures; len(f) != 1 || f[0].Volume != "w" {
		t.Fatalf("failures with w failing: %+v", f)
	}
	s.apply(&api.HeartbeatResponse{Assignments: []api.VolumeAssignment{a}}, clk)
	if f := s.report().Failures; len(f) != 0 {
		t.Fatalf("failures after w was unassigned: %+v", f)
	}
}
