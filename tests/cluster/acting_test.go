package cluster

import (
	"context"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// The acting set end to end (issue 17): real masters and servers, kill -9,
// and qemu-io as the client. qemu-io opens the image writethrough by
// default, so each write goes out with FUA: every probe below is a
// durable write, acknowledged only under the volume's durability rule.

// leaseTTL is the harness master's --lease-ttl; the goal is a
// durable write within leaseTTL + 1 s of a kill.
const leaseTTL = 3 * time.Second

// durableWrite writes one 4 KiB block with FUA through qemu-io and
// reports whether the server acknowledged it.
func durableWrite(nbdAddr, vol string, off int64, pattern byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-io", "-f", "raw", "-t", "writethrough",
		"-c", fmt.Sprintf("write -P 0x%02x %d 4k", pattern, off), fmt.Sprintf("nbd://%s/%s", nbdAddr, vol))
	out, err := cmd.CombinedOutput()
	s := string(out)
	if err == nil && (strings.Contains(s, "failed") || !strings.Contains(s, "wrote")) {
		err = fmt.Errorf("qemu-io: %s", strings.TrimSpace(s))
	} else if err != nil {
		err = fmt.Errorf("qemu-io: %v: %s", err, strings.TrimSpace(s))
	}
	return err
}

// firstDurableWrite probes the given servers concurrently with durable
// writes until one acknowledges; it returns when that write returned and
// which server took it.
func firstDurableWrite(t *testing.T, c *cluster, vol string, ids []string, off int64, d time.Duration) (time.Time, string) {
	t.Helper()
	type hit struct {
		at time.Time
		id string
	}
	done := make(chan hit, len(ids))
	stop := make(chan struct{})
	defer close(stop)
	deadline := time.Now().Add(d)
	for _, id := range ids {
		go func(id string) {
			for time.Now().Before(deadline) {
				select {
				case <-stop:
					return
				default:
				}
				if err := durableWrite(c.nbd[id], vol, off, 0x3c); err == nil {
					done <- hit{time.Now(), id}
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}(id)
	}
	select {
	case h := <-done:
		return h.at, h.id
	case <-time.After(d):
		t.Fatalf("no durable write on %v acknowledged within %v", ids, d)
	}
	return time.Time{}, ""
}

// writeLoad writes durably to one server in a loop and records every
// failure and the slowest acknowledgement.
type writeLoad struct {
	mu       sync.Mutex
	ok, fail int
	slowest  time.Duration
	failures []string
	stop     chan struct{}
	done     chan struct{}
}

func startLoad(c *cluster, nbdAddr, vol string, off int64) *writeLoad {
	w := &writeLoad{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			start := time.Now()
			err := durableWrite(nbdAddr, vol, off+int64(i%64)*4096, byte(i))
			d := time.Since(start)
			w.mu.Lock()
			if err != nil {
				w.fail++
				if len(w.failures) < 5 {
					w.failures = append(w.failures, fmt.Sprintf("%s: %v", start.Format("15:04:05.000"), err))
				}
			} else {
				w.ok++
				w.slowest = max(w.slowest, d)
			}
			w.mu.Unlock()
			time.Sleep(50 * time.Millisecond)
		}
	}()
	return w
}

func (w *writeLoad) end() (ok, fail int, slowest time.Duration, failures []string) {
	close(w.stop)
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ok, w.fail, w.slowest, w.failures
}

func (c *cluster) createVolume(req api.CreateVolumeRequest) *api.VolumeInfo {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.client.CreateVolume(ctx, req); err != nil {
		c.t.Fatalf("create %s: %v", req.Name, err)
	}
	return c.waitHealthy(req.Name, 60*time.Second)
}

// waitActing waits until cond holds for the volume's info.
func (c *cluster) waitActing(vol, what string, d time.Duration, cond func(*api.VolumeInfo) error) *api.VolumeInfo {
	c.t.Helper()
	var info *api.VolumeInfo
	c.waitFor(vol+": "+what, d, func() error {
		var err error
		if info, err = c.client.VolumeInfo(context.Background(), vol); err != nil {
			return err
		}
		return cond(info)
	})
	return info
}

func inSet(info *api.VolumeInfo, id string) bool   { return slices.Contains(info.ActingSet, id) }
func isStale(info *api.VolumeInfo, id string) bool { return slices.Contains(info.Stale, id) }

func replicaState(info *api.VolumeInfo, id string) string {
	for _, r := range info.Replicas {
		if r.ServerID == id {
			return r.State
		}
	}
	return ""
}

func threeServers(t *testing.T) *cluster {
	c := newCluster(t)
	c.startMaster()
	for _, id := range []string{"s1", "s2", "s3"} {
		c.startServer(id)
	}
	return c
}

// (a) and (c): a replica of an RF=3 sync_all volume is killed: the next
// durable write is acknowledged within the lease TTL + 1 s and the dead
// replica leaves the acting set; when it returns it catches up and
// re-enters the set with no failed durable write on the way.
func TestActingReplicaKilledAndReturns(t *testing.T) {
	c := threeServers(t)
	info := c.createVolume(api.CreateVolumeRequest{Name: "db", SizeBytes: 64 << 20, RF: 3, Durability: api.DurabilitySyncAll})
	if info.MinCopies != 2 || len(info.ActingSet) != 3 || !info.FlushesOK {
		t.Fatalf("new volume: min_copies %d acting %v flushes_ok %v", info.MinCopies, info.ActingSet, info.FlushesOK)
	}
	prim, victim := info.Primary.ServerID, info.Replicas[0].ServerID
	if err := durableWrite(c.nbd[prim], "db", 0, 0x11); err != nil {
		t.Fatalf("durable write while healthy: %v", err)
	}

	killed := time.Now()
	c.servers[victim].kill9()
	at, _ := firstDurableWrite(t, c, "db", []string{prim}, 4096, 60*time.Second)
	outage := at.Sub(killed)
	t.Logf("REPLICA KILLED: kill -9 of %s to the next durable (FUA) write acknowledged by %s: %v (goal: lease TTL %v + 1s)",
		victim, prim, outage.Round(10*time.Millisecond), leaseTTL)
	if outage > leaseTTL+time.Second {
		t.Errorf("durable write outage %v after a replica kill exceeds lease TTL + 1s", outage)
	}
	info = c.waitActing("db", victim+" out of the set", 30*time.Second, func(i *api.VolumeInfo) error {
		if inSet(i, victim) || !isStale(i, victim) {
			return fmt.Errorf("acting %v stale %v", i.ActingSet, i.Stale)
		}
		return nil
	})
	t.Logf("after the kill: epoch %d acting %v stale %v flushes_ok %v", info.Epoch, info.ActingSet, info.Stale, info.FlushesOK)

	// (c) The replica returns while a client keeps writing durably.
	load := startLoad(c, c.nbd[prim], "db", 8<<20)
	returned := time.Now()
	c.startServer(victim)
	info = c.waitActing("db", victim+" back in the set", 90*time.Second, func(i *api.VolumeInfo) error {
		if !inSet(i, victim) || replicaState(i, victim) != api.StateInSync {
			return fmt.Errorf("acting %v stale %v state %s", i.ActingSet, i.Stale, replicaState(i, victim))
		}
		return nil
	})
	rejoin := time.Since(returned)
	time.Sleep(time.Second) // the epoch bump of the grow reaches every server
	ok, fail, slowest, failures := load.end()
	t.Logf("RETURN: %s back in the acting set %v after restart (epoch %d); durable writes during the return: %d acknowledged, %d failed, slowest %v",
		victim, rejoin.Round(10*time.Millisecond), info.Epoch, ok, fail, slowest.Round(time.Millisecond))
	if fail > 0 || ok == 0 {
		t.Errorf("durable-write outage while %s returned: %d ok, %d failed: %v", victim, ok, fail, failures)
	}
	if err := durableWrite(c.nbd[prim], "db", 4096, 0x22); err != nil {
		t.Fatalf("durable write with the set whole again: %v", err)
	}
}

// (b): the primary of an RF=3 sync_all volume is killed: the first durable
// write acknowledged by the new primary comes within the lease TTL + 1 s,
// and the old primary leaves the set in the same decision; when it returns
// it re-enters the set.
func TestActingPrimaryKilled(t *testing.T) {
	c := threeServers(t)
	info := c.createVolume(api.CreateVolumeRequest{Name: "db", SizeBytes: 64 << 20, RF: 3, Durability: api.DurabilitySyncAll})
	old, epoch := info.Primary.ServerID, info.Epoch
	var others []string
	for _, r := range info.Replicas {
		others = append(others, r.ServerID)
	}
	for i := 0; i < 4; i++ {
		if err := durableWrite(c.nbd[old], "db", int64(i)*4096, byte(0x40+i)); err != nil {
			t.Fatalf("durable write before the kill: %v", err)
		}
	}

	killed := time.Now()
	c.servers[old].kill9()
	at, by := firstDurableWrite(t, c, "db", others, 1<<20, 60*time.Second)
	outage := at.Sub(killed)
	t.Logf("PRIMARY KILLED: kill -9 of %s to the first durable (FUA) write acknowledged by the new primary %s: %v (goal: lease TTL %v + 1s)",
		old, by, outage.Round(10*time.Millisecond), leaseTTL)
	if outage > leaseTTL+time.Second {
		t.Errorf("durable write outage %v after a primary kill exceeds lease TTL + 1s", outage)
	}
	info = c.info("db")
	if info.Primary.ServerID != by || info.Epoch <= epoch || inSet(info, old) || !isStale(info, old) {
		t.Fatalf("after failover: primary %s epoch %d acting %v stale %v", info.Primary.ServerID, info.Epoch, info.ActingSet, info.Stale)
	}
	// Everything durable before the kill reads back through the new primary.
	var reads []string
	for i := 0; i < 4; i++ {
		reads = append(reads, fmt.Sprintf("read -P 0x%02x %d 4k", 0x40+i, i*4096))
	}
	if out, err := c.qemuIO(c.nbd[by], "db", reads...); err != nil {
		t.Fatalf("durable writes lost in the failover: %v\n%s", err, out)
	}

	// The old primary returns as a stale replica and re-enters the set.
	load := startLoad(c, c.nbd[by], "db", 8<<20)
	returned := time.Now()
	c.startServer(old)
	c.waitActing("db", old+" back in the set", 90*time.Second, func(i *api.VolumeInfo) error {
		if !inSet(i, old) || replicaState(i, old) != api.StateInSync {
			return fmt.Errorf("acting %v stale %v state %s", i.ActingSet, i.Stale, replicaState(i, old))
		}
		return nil
	})
	rejoin := time.Since(returned)
	time.Sleep(time.Second)
	ok, fail, slowest, failures := load.end()
	t.Logf("OLD PRIMARY RETURNS: %s back in the acting set after %v; durable writes meanwhile: %d acknowledged, %d failed, slowest %v",
		old, rejoin.Round(10*time.Millisecond), ok, fail, slowest.Round(time.Millisecond))
	if fail > 0 || ok == 0 {
		t.Errorf("durable-write outage while the old primary returned: %d ok, %d failed: %v", ok, fail, failures)
	}
}

// (d): two replicas of an RF=3 sync_all volume (min_copies 2) die: durable
// writes fail with EIO and volume info says why; when one returns they
// succeed again without an operator.
func TestActingBelowMinCopies(t *testing.T) {
	c := threeServers(t)
	info := c.createVolume(api.CreateVolumeRequest{Name: "db", SizeBytes: 64 << 20, RF: 3, Durability: api.DurabilitySyncAll})
	prim, r1, r2 := info.Primary.ServerID, info.Replicas[0].ServerID, info.Replicas[1].ServerID
	if err := durableWrite(c.nbd[prim], "db", 0, 0x11); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	c.servers[r1].kill9()
	c.servers[r2].kill9()
	// Past the lease TTL the set has shrunk as far as min_copies allows;
	// from then on every durable write is refused.
	info = c.waitActing("db", "flushes blocked", 30*time.Second, func(i *api.VolumeInfo) error {
		if i.FlushesOK || i.FlushBlocker == "" || time.Since(killed) < leaseTTL+time.Second {
			return fmt.Errorf("flushes_ok %v blocker %q", i.FlushesOK, i.FlushBlocker)
		}
		return nil
	})
	t.Logf("below min_copies: acting %v stale %v blocker %q", info.ActingSet, info.Stale, info.FlushBlocker)
	for i := 0; i < 2; i++ {
		start := time.Now()
		err := durableWrite(c.nbd[prim], "db", 4096, 0x66)
		if err == nil {
			t.Fatalf("a durable write was acknowledged with one copy of min_copies 2")
		}
		if !strings.Contains(err.Error(), "Input/output error") {
			t.Errorf("refused durable write: want EIO, got %v", err)
		}
		t.Logf("durable write below min_copies refused after %v: %v", time.Since(start).Round(10*time.Millisecond), err)
	}

	// One replica returns: durable writes resume on their own. The stale
	// one (not the dead member kept in the set) is the harder way: it must
	// catch up, be added back and the dead member removed.
	back := r1
	if len(info.Stale) > 0 {
		back = info.Stale[0]
	}
	returned := time.Now()
	c.startServer(back)
	at, _ := firstDurableWrite(t, c, "db", []string{prim}, 8192, 120*time.Second)
	t.Logf("BELOW MIN_COPIES: %s restarted; first durable write acknowledged %v later, no operator action",
		back, at.Sub(returned).Round(10*time.Millisecond))
	info = c.waitActing("db", "flushes ok again", 30*time.Second, func(i *api.VolumeInfo) error {
		if !i.FlushesOK {
			return fmt.Errorf("blocker %q", i.FlushBlocker)
		}
		return nil
	})
	t.Logf("after the return: epoch %d acting %v stale %v", info.Epoch, info.ActingSet, info.Stale)
}

// (e): sync_quorum RF=3: one replica dead costs no durable write; two dead
// means no acknowledgement; one back and writes resume.
func TestActingSyncQuorum(t *testing.T) {
	c := threeServers(t)
	info := c.createVolume(api.CreateVolumeRequest{Name: "q", SizeBytes: 64 << 20, RF: 3, Durability: api.DurabilitySyncQuorum})
	prim, r1, r2 := info.Primary.ServerID, info.Replicas[0].ServerID, info.Replicas[1].ServerID
	load := startLoad(c, c.nbd[prim], "q", 0)
	time.Sleep(time.Second)
	c.servers[r1].kill9()
	time.Sleep(leaseTTL + 2*time.Second) // well past the shrink
	ok, fail, slowest, failures := load.end()
	info = c.info("q")
	t.Logf("SYNC_QUORUM ONE DEAD: kill -9 of %s: %d durable writes acknowledged, %d failed, slowest %v; acting %v stale %v",
		r1, ok, fail, slowest.Round(time.Millisecond), info.ActingSet, info.Stale)
	if fail > 0 || ok == 0 {
		t.Errorf("sync_quorum with one replica dead: %d ok, %d failed: %v", ok, fail, failures)
	}
	c.servers[r2].kill9()
	c.waitActing("q", "flushes blocked", 30*time.Second, func(i *api.VolumeInfo) error {
		if i.FlushesOK {
			return fmt.Errorf("flushes_ok with two replicas dead (acting %v)", i.ActingSet)
		}
		return nil
	})
	if err := durableWrite(c.nbd[prim], "q", 4096, 0x77); err == nil {
		t.Fatal("sync_quorum acknowledged a durable write with two of three copies dead")
	} else {
		t.Logf("SYNC_QUORUM TWO DEAD: durable write refused: %v", err)
	}
	returned := time.Now()
	c.startServer(r2)
	at, _ := firstDurableWrite(t, c, "q", []string{prim}, 8192, 120*time.Second)
	t.Logf("SYNC_QUORUM: %s restarted; first durable write acknowledged %v later", r2, at.Sub(returned).Round(10*time.Millisecond))
}

// RF=2 with the default min_copies 1 (the database preset) behaves like
// DRBD: when the replica dies the primary outdates it (it leaves the
// acting set, stale) and durable writes go on alone; the stale replica is
// not a failover candidate.
func TestActingRF2ReplicaKilled(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	c.startServer("s1")
	c.startServer("s2")
	info := c.createVolume(api.CreateVolumeRequest{Name: "db", SizeBytes: 64 << 20, Preset: "database"})
	if info.RF != 2 || info.MinCopies != 1 || info.Durability != api.DurabilitySyncAll {
		t.Fatalf("database preset: rf %d min_copies %d durability %s", info.RF, info.MinCopies, info.Durability)
	}
	prim, victim := info.Primary.ServerID, info.Replicas[0].ServerID
	killed := time.Now()
	c.servers[victim].kill9()
	at, _ := firstDurableWrite(t, c, "db", []string{prim}, 4096, 60*time.Second)
	t.Logf("RF2 REPLICA KILLED: kill -9 of %s to the next durable write on %s: %v (goal: lease TTL %v + 1s)",
		victim, prim, at.Sub(killed).Round(10*time.Millisecond), leaseTTL)
	if d := at.Sub(killed); d > leaseTTL+time.Second {
		t.Errorf("durable write outage %v after the RF2 replica kill exceeds lease TTL + 1s", d)
	}
	info = c.waitActing("db", victim+" stale", 30*time.Second, func(i *api.VolumeInfo) error {
		if !isStale(i, victim) || !i.FlushesOK {
			return fmt.Errorf("acting %v stale %v flushes_ok %v (%s)", i.ActingSet, i.Stale, i.FlushesOK, i.FlushBlocker)
		}
		return nil
	})
	pf, err := c.client.Preflight(context.Background(), "db")
	if err != nil {
		t.Fatal(err)
	}
	if pf.Best != "" || len(pf.Candidates) != 1 || !slices.Contains(pf.Candidates[0].Reasons, api.ReasonStale) {
		t.Fatalf("preflight with the outdated replica: %+v", pf)
	}
}
