package master

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/internal/testenv"
)

// ---- captured logs ----

type logSink struct {
	mu   sync.Mutex
	recs []map[string]any
}

type sinkHandler struct {
	s     *logSink
	attrs []slog.Attr
}

func (h *sinkHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *sinkHandler) Handle(_ context.Context, r slog.Record) error {
	m := map[string]any{"msg": r.Message}
	for _, a := range h.attrs {
		m[a.Key] = a.Value.Any()
	}
	r.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.Any(); return true })
	h.s.mu.Lock()
	h.s.recs = append(h.s.recs, m)
	h.s.mu.Unlock()
	if os.Getenv("MASTER_TEST_LOG") != "" {
		fmt.Fprintln(os.Stderr, m)
	}
	return nil
}
func (h *sinkHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &sinkHandler{s: h.s, attrs: append(append([]slog.Attr(nil), h.attrs...), as...)}
}
func (h *sinkHandler) WithGroup(string) slog.Handler { return h }

func (s *logSink) logger() *slog.Logger { return slog.New(&sinkHandler{s: s}) }

// find returns the records with msg whose attrs include every key=value of kv.
func (s *logSink) find(msg string, kv ...any) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
next:
	for _, r := range s.recs {
		if r["msg"] != msg {
			continue
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if fmt.Sprint(r[kv[i].(string)]) != fmt.Sprint(kv[i+1]) {
				continue next
			}
		}
		out = append(out, r)
	}
	return out
}

// ---- helpers ----

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freePort(t *testing.T) string { return testenv.FreeAddr(t) }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func startMaster(t *testing.T, cfg Config) *Master {
	t.Helper()
	m, err := Start(cfg)
	if err != nil {
		t.Fatalf("start master: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// ---- a fake volume server: real heartbeats through api.Client ----

type fakeVol struct {
	api.HeartbeatVolume
	leaseUntil time.Time // as the real server computes it: send time + TTL
}

type fakeServer struct {
	id, addr, nbd string
	c             *api.Client

	mu        sync.Mutex
	vols      map[string]*fakeVol
	replies   []*api.HeartbeatResponse
	leaseLog  map[string][]leaseGrant // volume -> grants received
	states    map[string]string       // replica ID -> the state this server reports as primary (default InSync)
	failures  []api.VolumeFailure     // sent with every heartbeat
	expandErr string                  // reported for every expand it is asked to prepare
	expandOld bool                    // knows nothing of two-phase expand (never prepares)
	beats     int
	stopBeats chan struct{}
	done      chan struct{}
}

type leaseGrant struct {
	epoch          uint64
	sent, received time.Time
	ttl            time.Duration
}

// newFakeServer: server n advertises 127.0.0.1:2100n (control) and :1080n (NBD).
func newFakeServer(id string, n int, masters []string) *fakeServer {
	return &fakeServer{id: id, addr: fmt.Sprintf("127.0.0.1:%d", 21000+n), nbd: fmt.Sprintf("127.0.0.1:%d", 10800+n),
		c: api.NewClient(masters), vols: map[string]*fakeVol{}, leaseLog: map[string][]leaseGrant{}, states: map[string]string{}}
}

// beat sends one heartbeat and applies the reply like a real server would.
func (f *fakeServer) beat(ctx context.Context) (*api.HeartbeatResponse, error) {
	f.mu.Lock()
	req := api.HeartbeatRequest{ServerID: f.id, Addr: f.addr, NBDAddr: f.nbd, CapacityBytes: 100 << 30, FreeBytes: 90 << 30,
		Failures: append([]api.VolumeFailure(nil), f.failures...)}
	for _, v := range f.vols {
		hv := v.HeartbeatVolume
		hv.Replicas = append([]api.HeartbeatReplica(nil), v.Replicas...)
		req.Volumes = append(req.Volumes, hv)
	}
	f.mu.Unlock()
	sent := time.Now()
	resp, err := f.c.Heartbeat(ctx, req)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.beats++
	f.replies = append(f.replies, resp)
	for _, a := range resp.Assignments {
		v := f.vols[a.Volume]
		if v == nil {
			v = &fakeVol{HeartbeatVolume: api.HeartbeatVolume{Name: a.Volume}}
			f.vols[a.Volume] = v
		}
		if a.Epoch >= v.Epoch { // epochs never go back
			v.ID, v.Role, v.Epoch = a.ID, a.Role, a.Epoch
		}
		f.applyExpand(v, a)
		if a.Role == api.RolePrimary && a.LeaseTTLMS > 0 {
			ttl := time.Duration(a.LeaseTTLMS) * time.Millisecond
			v.leaseUntil = sent.Add(ttl)
			f.leaseLog[a.Volume] = append(f.leaseLog[a.Volume], leaseGrant{epoch: a.Epoch, sent: sent, received: now, ttl: ttl})
		}
		if a.Role == api.RolePrimary {
			v.Replicas = nil
			for _, r := range a.Replicas {
				st := api.StateInSync
				if s, ok := f.states[r.ServerID]; ok {
					st = s
				}
				v.Replicas = append(v.Replicas, api.HeartbeatReplica{ServerID: r.ServerID, State: st, FlushedLSN: v.DurableLSN})
			}
		} else {
			v.Replicas = nil
		}
	}
	for _, d := range resp.Drop {
		delete(f.vols, d)
	}
	return resp, nil
}

// applyExpand does what a real server does with the size fields of an
// assignment (server/expand.go), without files.
func (f *fakeServer) applyExpand(v *fakeVol, a api.VolumeAssignment) {
	if f.expandOld {
		return
	}
	if a.SizeBytes > v.SizeBytes {
		v.SizeBytes, v.PendingSizeBytes, v.ExpandID = a.SizeBytes, 0, 0
	}
	switch {
	case a.ExpandID != 0 && f.expandErr != "":
		v.ExpandID, v.ExpandError = a.ExpandID, f.expandErr
	case a.ExpandID != 0:
		v.PendingSizeBytes, v.ExpandID, v.ExpandError = a.ExpandSizeBytes, a.ExpandID, ""
	default:
		v.PendingSizeBytes, v.ExpandID, v.ExpandError = 0, 0, ""
	}
}

// run heartbeats until stop; errors are ignored (masters may be down).
func (f *fakeServer) run(interval time.Duration) {
	f.mu.Lock()
	f.stopBeats, f.done = make(chan struct{}), make(chan struct{})
	stop, done := f.stopBeats, f.done
	f.mu.Unlock()
	go func() {
		defer close(done)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, _ = f.beat(ctx)
			cancel()
			select {
			case <-stop:
				return
			case <-time.After(interval):
			}
		}
	}()
}

func (f *fakeServer) stop() {
	f.mu.Lock()
	stop, done := f.stopBeats, f.done
	f.stopBeats = nil
	f.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

func (f *fakeServer) setLSN(vol string, head, durable uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if v := f.vols[vol]; v != nil {
		v.HeadLSN, v.DurableLSN, v.CheckpointLSN = head, durable, durable
		for i := range v.Replicas {
			v.Replicas[i].FlushedLSN = durable
		}
	}
}

func (f *fakeServer) vol(name string) (fakeVol, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.vols[name]
	if !ok {
		return fakeVol{}, false
	}
	return *v, true
}

// waitVol waits until f applied an assignment of vol at epoch.
func (f *fakeServer) waitVol(t *testing.T, vol string, epoch uint64) {
	t.Helper()
	waitFor(t, f.id+" holds "+vol, 30*time.Second, func() bool { v, ok := f.vol(vol); return ok && v.Epoch == epoch })
}

func (f *fakeServer) grants(vol string) []leaseGrant {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]leaseGrant(nil), f.leaseLog[vol]...)
}

func volInfo(t *testing.T, c *api.Client, name string) *api.VolumeInfo {
	t.Helper()
	v, err := c.VolumeInfo(ctxT(t), name)
	if err != nil {
		t.Fatalf("info %s: %v", name, err)
	}
	return v
}

func joinIDs(vs []api.VolumeInfo) string {
	var n []string
	for _, v := range vs {
		n = append(n, v.Name)
	}
	return strings.Join(n, ",")
}

// runFakeServers starts heartbeating fake servers for the test's duration.
func runFakeServers(t *testing.T, masters []string, ids ...string) {
	t.Helper()
	for i, id := range ids {
		f := newFakeServer(id, i+1, masters)
		f.run(200 * time.Millisecond)
		t.Cleanup(f.stop)
	}
}

// setState makes f, as a primary, report replica id in state st.
func (f *fakeServer) setState(id, st string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.states[id] = st
}

// lastAssignment returns the last assignment of vol f received.
func (f *fakeServer) lastAssignment(vol string) (api.VolumeAssignment, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.replies) - 1; i >= 0; i-- {
		for _, a := range f.replies[i].Assignments {
			if a.Volume == vol {
				return a, true
			}
		}
	}
	return api.VolumeAssignment{}, false
}
