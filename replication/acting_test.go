package replication

import (
	"errors"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
)

// actingHost is one in-process volume server (a real Host on a real TCP
// listener) that can be killed and started again on the same address.
type actingHost struct {
	t    *testing.T
	id   string
	addr string
	clk  *clock
	log  *slog.Logger
	tmpl PrimaryConfig
	h    *Host
	node *node
}

func startActingHost(t *testing.T, id string, n *node, clk *clock, log *slog.Logger, tmpl PrimaryConfig) *actingHost {
	ah := &actingHost{t: t, id: id, addr: "127.0.0.1:0", clk: clk, log: log, tmpl: tmpl, node: n}
	ah.start()
	t.Cleanup(ah.kill)
	return ah
}

func (ah *actingHost) start() {
	ah.t.Helper()
	var ln net.Listener
	var err error
	for i := 0; i < 200; i++ {
		if ln, err = net.Listen("tcp", ah.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		ah.t.Fatalf("listen %s: %v", ah.addr, err)
	}
	ah.addr = ln.Addr().String()
	ah.h = NewHost(HostConfig{ServerID: ah.id, Now: ah.clk.now, Logger: ah.log.With("host", ah.id), Primary: ah.tmpl})
	go ah.h.Serve(ln)
	if err := ah.h.AddVolume("v1", ah.node.vol); err != nil {
		ah.t.Fatal(err)
	}
}

// kill stops the server the way a crash does: its connections reset, its
// volume is reopened (recovery runs) when it starts again.
func (ah *actingHost) kill() {
	if ah.h != nil {
		ah.h.Close()
		ah.h = nil
	}
}

func (ah *actingHost) restart() {
	ah.t.Helper()
	ah.kill()
	ah.node.reopen()
	ah.start()
}

func (ah *actingHost) apply(a Assignment) {
	ah.t.Helper()
	a.Volume = "v1"
	if err := ah.h.Apply(a); err != nil {
		ah.t.Fatalf("%s: apply %+v: %v", ah.id, a, err)
	}
}

// rf3 is a primary and two replicas, all real Hosts over TCP.
type rf3 struct {
	t       *testing.T
	clk     *clock
	a, b, c *actingHost
	lease   time.Time
}

func newRF3(t *testing.T, log *slog.Logger, flushWait time.Duration) *rf3 {
	clk := &clock{t: time.Unix(1_000_000, 0)}
	tmpl := PrimaryConfig{PingInterval: 100 * time.Millisecond, RetryMax: 200 * time.Millisecond, FlushWait: flushWait}
	c := &rf3{t: t, clk: clk, lease: clk.t.Add(time.Hour)}
	c.a = startActingHost(t, "srv-a", newNode(t, testVolSize), clk, log, tmpl)
	c.b = startActingHost(t, "srv-b", newNode(t, testVolSize), clk, log, tmpl)
	c.c = startActingHost(t, "srv-c", newNode(t, testVolSize), clk, log, tmpl)
	return c
}

// assign is the master's decision at epoch: the replicas first (as their
// heartbeats would), then the primary with the acting set.
func (c *rf3) assign(epoch uint64, mode Durability, minCopies int, acting []string, alive ...*actingHost) {
	c.t.Helper()
	for _, r := range alive {
		r.apply(Assignment{Role: RoleReplica, Epoch: epoch, PrimaryID: "srv-a"})
	}
	c.a.apply(Assignment{Role: RolePrimary, Epoch: epoch, LeaseUntil: c.lease, Durability: mode, PrimaryID: "srv-a",
		Replicas: []Peer{{"srv-b", c.b.addr}, {"srv-c", c.c.addr}}, ActingSet: acting, MinCopies: minCopies})
}

func (c *rf3) primary() *Primary {
	c.t.Helper()
	p, ok := c.a.h.Primary("v1")
	if !ok {
		c.t.Fatal("srv-a is not primary")
	}
	return p
}

func flushAsync(dev blockdev.Device) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- dev.Flush() }()
	return ch
}

func notReturned(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	// Long enough for a wrong answer to show; a slow machine only makes
	// this check weaker, never flaky.
	select {
	case err := <-ch:
		t.Fatalf("%s returned (%v) before the assignment changed", what, err)
	case <-time.After(300 * time.Millisecond):
	}
}

// RF=3 sync_all: a replica dies; flushes wait for it instead of failing;
// the master's next assignment without it releases the waiting flush.
// The dead replica is still shipped to (and caught up) once it returns,
// but not counted until the master adds it back.
func TestActingSetShrinkReleasesWaitingFlush(t *testing.T) {
	logs, log := newCapture()
	c := newRF3(t, log, time.Minute) // the wait outlasts the test: only the assignment can release it
	c.assign(1, SyncAll, 2, []string{"srv-b", "srv-c"}, c.b, c.c)
	p := c.primary()
	waitState(t, p, "srv-b", InSync)
	waitState(t, p, "srv-c", InSync)
	for i := int64(0); i < 20; i++ {
		if err := p.WriteAt(pattern(i, 1), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(); err != nil {
		t.Fatalf("flush with the whole set up: %v", err)
	}

	c.c.kill()
	waitFor(t, "srv-c not in sync", func() bool { st, _ := replicaState(p, "srv-c"); return st.State != InSync })
	if err := p.WriteAt(pattern(30, 1), 30*4096, false); err != nil {
		t.Fatal(err)
	}
	lsn := c.a.node.vol.HeadLSN()
	done := flushAsync(p)
	notReturned(t, done, "flush with a dead acting-set member")

	// The master shrinks the set (epoch 2): the waiting flush succeeds.
	c.assign(2, SyncAll, 2, []string{"srv-b"}, c.b)
	if err := <-done; err != nil {
		t.Fatalf("waiting flush after the set shrank: %v", err)
	}
	if st, _ := replicaState(p, "srv-b"); st.FlushedLSN < lsn {
		t.Fatalf("flush acknowledged before the remaining member was durable: %d < %d", st.FlushedLSN, lsn)
	}
	logs.waitEvent(t, EvActingSet, map[string]string{"host": "srv-a", "epoch": "2", "stale": `["srv-c"]`})
	for i := int64(0); i < 20; i++ {
		if err := p.WriteAt(pattern(i, 2), i*4096, true); err != nil {
			t.Fatalf("FUA write with srv-c outside the set: %v", err)
		}
	}

	// srv-c returns: it is caught up (shipped to, recovered) while stale,
	// and flushes never wait for it.
	c.c.restart()
	c.c.apply(Assignment{Role: RoleReplica, Epoch: 2, PrimaryID: "srv-a"})
	waitState(t, p, "srv-c", InSync)
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	sameData(t, c.a.node.vol, c.c.node.vol)
	// The master adds it back (epoch 3).
	sc := sessionOf(p, "srv-c")
	c.assign(3, SyncAll, 2, []string{"srv-b", "srv-c"}, c.b, c.c)
	waitNewSession(t, p, "srv-c", sc)
	if err := p.WriteAt(pattern(40, 3), 40*4096, true); err != nil {
		t.Fatal(err)
	}
	if st, _ := replicaState(p, "srv-c"); st.FlushedLSN < c.a.node.vol.HeadLSN() {
		t.Fatalf("FUA write acknowledged before the re-added member was durable")
	}
	if n := len(logs.find(EvFlushFailed, nil)); n != 0 {
		t.Fatalf("%d flushes failed; log:\n%s", n, logs.tail())
	}
}

// A replica outside the set is never counted, even when it is InSync: with
// MinCopies 2 and an empty acting set every flush fails with EIO, naming
// the rule; once the master re-adds a recovered member, flushes succeed
// again without anyone touching the primary.
func TestBelowMinCopiesFailsThenRecovers(t *testing.T) {
	logs, log := newCapture()
	c := newRF3(t, log, 300*time.Millisecond)
	c.assign(1, SyncAll, 2, []string{"srv-b", "srv-c"}, c.b, c.c)
	p := c.primary()
	waitState(t, p, "srv-b", InSync)
	waitState(t, p, "srv-c", InSync)
	if err := p.WriteAt(pattern(1, 1), 4096, true); err != nil {
		t.Fatal(err)
	}
	c.b.kill()
	c.c.kill()
	// The master removes both dead members: the primary alone is below min_copies.
	c.assign(2, SyncAll, 2, []string{})
	if err := p.WriteAt(pattern(2, 1), 2*4096, false); err != nil {
		t.Fatal(err)
	}
	err := p.Flush()
	if !errors.Is(err, blockdev.ErrIO) || blockdev.Errno(err) != syscall.EIO {
		t.Fatalf("flush below min_copies: %v", err)
	}
	if err := p.WriteAt(pattern(3, 1), 3*4096, true); !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("FUA write below min_copies: %v", err)
	}
	ev := logs.waitEvent(t, EvFlushFailed, map[string]string{"reason": "below_min_copies", "rule": "min_copies", "min_copies": "2", "copies": "1"})
	t.Logf("flush_failed: %v; error: %v", ev["detail"], err)

	// srv-b returns and is caught up, but it is stale: still no ack.
	c.b.restart()
	c.b.apply(Assignment{Role: RoleReplica, Epoch: 2, PrimaryID: "srv-a"})
	waitState(t, p, "srv-b", InSync)
	if err := p.Flush(); !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("flush counted a replica outside the acting set: %v", err)
	}
	// The master re-adds it (epoch 3): flushes succeed again.
	sb := sessionOf(p, "srv-b")
	c.assign(3, SyncAll, 2, []string{"srv-b"}, c.b)
	waitNewSession(t, p, "srv-b", sb)
	if err := p.Flush(); err != nil {
		t.Fatalf("flush after srv-b was re-added: %v", err)
	}
	if err := p.WriteAt(pattern(4, 1), 4*4096, true); err != nil {
		t.Fatal(err)
	}
	if st, _ := replicaState(p, "srv-b"); st.FlushedLSN < c.a.node.vol.HeadLSN() {
		t.Fatalf("FUA write acknowledged before srv-b was durable")
	}
}

// Epoch bumps with the same primary (the master shrinking and growing the
// set while every server is up) re-Hello the sessions at the new epoch;
// writers with flushes running across them see no failure.
func TestEpochBumpSamePrimaryKeepsFlushing(t *testing.T) {
	logs, log := newCapture()
	c := newRF3(t, log, 4*time.Second)
	c.assign(1, SyncAll, 2, []string{"srv-b", "srv-c"}, c.b, c.c)
	p := c.primary()
	waitState(t, p, "srv-b", InSync)
	waitState(t, p, "srv-c", InSync)

	var halt atomic.Bool
	var flushes, failures atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; !halt.Load(); i++ {
				lba := int64(g*256 + i%256)
				if err := p.WriteAt(pattern(lba, i), lba*4096, i%8 == 7); err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				if i%4 == 3 {
					if err := p.Flush(); err != nil {
						failures.Add(1)
						firstErr.CompareAndSwap(nil, err)
					}
					flushes.Add(1)
				}
			}
		}(g)
	}
	sets := [][]string{{"srv-b"}, {"srv-b", "srv-c"}, {"srv-c"}, {"srv-b", "srv-c"}, {"srv-b", "srv-c"}}
	for i, set := range sets {
		before := flushes.Load()
		waitFor(t, "flushes at this epoch", func() bool { return flushes.Load() > before+20 })
		sb, sc := sessionOf(p, "srv-b"), sessionOf(p, "srv-c")
		c.assign(uint64(i+2), SyncAll, 2, set, c.b, c.c)
		waitNewSession(t, p, "srv-b", sb)
		waitNewSession(t, p, "srv-c", sc)
		logs.waitEvent(t, EvSessionCreated, map[string]string{"host": "srv-a", "replica": "srv-b", "epoch": strconv.Itoa(i + 2)})
	}
	before := flushes.Load()
	waitFor(t, "flushes at the last epoch", func() bool { return flushes.Load() > before+20 })
	halt.Store(true)
	wg.Wait()
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d writes/flushes failed across epoch bumps, first: %v", n, firstErr.Load())
	}
	t.Logf("%d flushes across %d epoch bumps, none failed", flushes.Load(), len(sets))
	if err := p.Flush(); err != nil {
		t.Fatal(err)
	}
	sameData(t, c.a.node.vol, c.b.node.vol)
	sameData(t, c.a.node.vol, c.c.node.vol)
}

// waitNewSession waits until replica id is InSync on a session other than old.
func waitNewSession(t *testing.T, p *Primary, id string, old uint64) {
	t.Helper()
	waitFor(t, id+" in sync on a new session", func() bool {
		st, _ := replicaState(p, id)
		return st.State == InSync && st.Session != old
	})
}

func sessionOf(p *Primary, id string) uint64 { st, _ := replicaState(p, id); return st.Session }
