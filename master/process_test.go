package master

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// The test binary doubles as a master process: with BLOCKD_MASTER_CHILD
// set it runs master.Start with the JSON config it names and waits for a
// signal, so tests can kill -9 real master processes.

type childConfig struct {
	DataDir, APIAddr, RaftAddr string
	Peers                      []string
	LeaseTTL                   time.Duration
}

func TestMain(m *testing.M) {
	if cfgJSON := os.Getenv("BLOCKD_MASTER_CHILD"); cfgJSON != "" {
		os.Exit(childMain(cfgJSON))
	}
	os.Exit(m.Run())
}

func childMain(cfgJSON string) int {
	var cc childConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cc); err != nil {
		fmt.Fprintln(os.Stderr, "child config:", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	m, err := Start(Config{DataDir: cc.DataDir, APIAddr: cc.APIAddr, RaftAddr: cc.RaftAddr, Peers: cc.Peers, LeaseTTL: cc.LeaseTTL, Logger: log})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start:", err)
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	<-sig
	if err := m.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		return 1
	}
	return 0
}

type masterProc struct {
	cfg  childConfig
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func startProc(t *testing.T, cc childConfig) *masterProc {
	t.Helper()
	b, _ := json.Marshal(cc)
	p := &masterProc{cfg: cc, log: filepath.Join(cc.DataDir, fmt.Sprintf("master-%d.log", time.Now().UnixNano())), done: make(chan struct{})}
	f, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(os.Args[0], "-test.run=^$")
	p.cmd.Env = append(os.Environ(), "BLOCKD_MASTER_CHILD="+string(b))
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); f.Close(); close(p.done) }()
	t.Cleanup(func() { p.kill() })
	return p
}

func (p *masterProc) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Kill() // SIGKILL
	<-p.done
}

func (p *masterProc) dumpLog(t *testing.T) {
	b, _ := os.ReadFile(p.log)
	t.Logf("log of master %s:\n%s", p.cfg.APIAddr, b)
}

// Three master processes: kill -9 the leader while a create is in flight;
// the volume is neither lost nor duplicated. Then kill -9 every master and
// restart them all: the same volumes, epochs and roles.
func TestProcessClusterKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process cluster in -short")
	}
	var apis []string
	var ccs []childConfig
	var peers []string
	for i := 0; i < 3; i++ {
		a, r := freePort(t), freePort(t)
		apis = append(apis, a)
		peers = append(peers, a+"="+r)
		ccs = append(ccs, childConfig{DataDir: t.TempDir(), APIAddr: a, RaftAddr: r, LeaseTTL: 2 * time.Second})
	}
	procs := map[string]*masterProc{}
	for i := range ccs {
		ccs[i].Peers = peers
		procs[apis[i]] = startProc(t, ccs[i])
	}
	defer func() {
		if t.Failed() {
			for _, p := range procs {
				p.dumpLog(t)
			}
		}
	}()
	c := api.NewClient(apis)
	leaderOf := func() string {
		for _, a := range apis {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err := c.Status(ctx, a)
			cancel()
			if err == nil && st.IsLeader {
				return a
			}
		}
		return ""
	}
	waitFor(t, "a leader", 60*time.Second, func() bool { return leaderOf() != "" })

	runFakeServers(t, apis, "s1", "s2", "s3")
	waitFor(t, "servers", 60*time.Second, func() bool { ss, err := c.Servers(ctxT(t)); return err == nil && len(ss) == 3 })
	for _, n := range []string{"a", "b"} {
		if _, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: n, SizeBytes: 1 << 30, RF: 2}); err != nil {
			t.Fatalf("create %s: %v", n, err)
		}
	}

	// Three rounds, killing the leader at different points of a create.
	want := "a,b"
	for round, delay := range []time.Duration{0, 2 * time.Millisecond, 10 * time.Millisecond} {
		waitFor(t, "a leader", 60*time.Second, func() bool { return leaderOf() != "" })
		lead := leaderOf()
		name := fmt.Sprintf("inflight%d", round)
		req := api.CreateVolumeRequest{Name: name, SizeBytes: 1 << 30, RF: 3, Durability: "sync_all", RequestID: api.NewRequestID()}
		var wg sync.WaitGroup
		var createErr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			_, createErr = c.CreateVolume(ctx, req)
		}()
		time.Sleep(delay)
		procs[lead].kill()
		wg.Wait()
		t.Logf("round %d: in-flight create across kill -9 of leader %s after %v: err=%v", round, lead, delay, createErr)
		if createErr != nil {
			// The caller retries with the same request ID.
			if _, err := c.CreateVolume(ctxT(t), req); err != nil {
				t.Fatalf("retry: %v", err)
			}
		}
		want += "," + name
		vols, err := c.ListVolumes(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if got := joinIDs(vols); got != want {
			t.Fatalf("volumes after leader kill -9 = %s, want %s", got, want)
		}
		// The killed master restarts and rejoins.
		procs[lead] = startProc(t, procs[lead].cfg)
	}
	vols, err := c.ListVolumes(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	before := map[string]api.VolumeInfo{}
	for _, v := range vols {
		before[v.Name] = v
	}
	// kill -9 every master, restart them all.
	for _, p := range procs {
		p.kill()
	}
	for a, p := range procs {
		procs[a] = startProc(t, p.cfg)
	}
	waitFor(t, "a leader after full restart", 60*time.Second, func() bool { return leaderOf() != "" })
	vols2, err := c.ListVolumes(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	sort.Slice(vols2, func(i, j int) bool { return vols2[i].Name < vols2[j].Name })
	if got := joinIDs(vols2); got != want {
		t.Fatalf("volumes after full restart = %s", got)
	}
	for _, v := range vols2 {
		b := before[v.Name]
		if v.ID != b.ID || v.Epoch != b.Epoch || v.Primary.ServerID != b.Primary.ServerID || len(v.Replicas) != len(b.Replicas) ||
			v.Durability != b.Durability || v.SizeBytes != b.SizeBytes {
			t.Fatalf("%s changed across restart: %+v -> %+v", v.Name, b, v)
		}
		for i := range v.Replicas {
			if v.Replicas[i].ServerID != b.Replicas[i].ServerID {
				t.Fatalf("%s replicas changed: %+v -> %+v", v.Name, b.Replicas, v.Replicas)
			}
		}
	}
}
