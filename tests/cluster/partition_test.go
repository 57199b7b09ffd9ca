package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// Issue 17's partition goal: the primary of an RF=3 sync_all volume is cut
// off from the master and from one replica at once, while a client keeps
// writing durably to it. The master must not shrink the set around a
// primary that may still be writing: the only change is the failover
// after the lease, to a member of the acting set, and every durable write
// the old primary acknowledged reads back from the new one.
func TestActingPartitionedPrimary(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	// s1 reaches the master through pxM; s1 reaches s2 through pxR (s2
	// advertises the proxy as its replication address).
	pxM := newProxy(t, c.mAPI[0])
	s2Listen := freePort(t)
	pxR := newProxy(t, s2Listen)
	c.mu.Lock()
	s1 := &proc{name: "s1", log: filepath.Join(c.dir, "s1.log"),
		args: []string{"server", "--id", "s1", "--data", filepath.Join(c.dir, "s1"),
			"--master", pxM.addr(), "--listen", freePort(t), "--nbd", freePort(t)}}
	c.servers["s1"], c.nbd["s1"] = s1, argAfter(s1.args, "--nbd")
	s2 := &proc{name: "s2", log: filepath.Join(c.dir, "s2.log"),
		args: []string{"server", "--id", "s2", "--data", filepath.Join(c.dir, "s2"),
			"--master", c.mAPI[0], "--listen", s2Listen, "--advertise", pxR.addr(), "--nbd", freePort(t)}}
	c.servers["s2"], c.nbd["s2"] = s2, argAfter(s2.args, "--nbd")
	c.mu.Unlock()
	s1.start(t)
	s2.start(t)
	c.startServer("s3")
	c.waitFor("s1 and s2 registered", 30*time.Second, func() error {
		ss, err := c.client.Servers(context.Background())
		if err != nil {
			return err
		}
		alive := 0
		for _, s := range ss {
			if s.Alive {
				alive++
			}
		}
		if alive != 3 {
			return fmt.Errorf("%d alive", alive)
		}
		return nil
	})
	info := c.createVolume(api.CreateVolumeRequest{Name: "db", SizeBytes: 64 << 20, RF: 3, Durability: api.DurabilitySyncAll})
	if info.Primary.ServerID != "s1" {
		if out, err := c.cli("volume", "promote", "db", "--target", "s1", "--force"); err != nil {
			t.Fatalf("promote s1: %v\n%s", err, out)
		}
		info = c.waitActing("db", "s1 primary, set whole", 60*time.Second, func(i *api.VolumeInfo) error {
			if i.Primary.ServerID != "s1" || i.Status != api.StatusHealthy || len(i.ActingSet) != 3 {
				return fmt.Errorf("primary %s status %s acting %v", i.Primary.ServerID, i.Status, i.ActingSet)
			}
			return nil
		})
	}
	c.waitFor("s1 acknowledges durable writes", 30*time.Second, func() error { return durableWrite(c.nbd["s1"], "db", 0, 0x01) })
	epoch := info.Epoch

	// The client writes durably to s1, a distinct block each time, and
	// remembers what was acknowledged.
	var mu sync.Mutex
	acked := map[int]byte{}
	stop := make(chan struct{})
	done := make(chan struct{})
	var lastAck time.Time
	go func() {
		defer close(done)
		for i := 1; i < 2000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := durableWrite(c.nbd["s1"], "db", int64(i)*4096, byte(i)); err == nil {
				mu.Lock()
				acked[i], lastAck = byte(i), time.Now()
				mu.Unlock()
			}
		}
	}()
	time.Sleep(time.Second)
	pxM.cut()
	pxR.cut()
	cutAt := time.Now()

	// The failover: s3 (the member still reachable) or s2, never a shrink first.
	var after *api.VolumeInfo
	c.waitFor("failover", 60*time.Second, func() error {
		i, err := c.client.VolumeInfo(context.Background(), "db")
		if err != nil {
			return err
		}
		if i.Epoch != epoch && i.Primary.ServerID == "s1" {
			return fmt.Errorf("the set changed around the partitioned primary: epoch %d acting %v", i.Epoch, i.ActingSet)
		}
		if i.Primary.ServerID == "s1" {
			return fmt.Errorf("primary still s1 (epoch %d)", i.Epoch)
		}
		after = i
		return nil
	})
	close(stop)
	<-done
	if after.Epoch != epoch+1 || inSet(after, "s1") {
		t.Fatalf("failover: epoch %d (was %d), acting %v stale %v", after.Epoch, epoch, after.ActingSet, after.Stale)
	}
	np := after.Primary.ServerID
	mu.Lock()
	n, last := len(acked), lastAck
	var reads []string
	for off, p := range acked {
		reads = append(reads, fmt.Sprintf("read -P 0x%02x %d 4k", p, off*4096))
	}
	mu.Unlock()
	t.Logf("PARTITION: s1 cut from the master and s2; %d durable writes acknowledged by s1, the last at %+v from the cut; %s promoted at epoch %d (acting %v)",
		n, last.Sub(cutAt).Round(10*time.Millisecond), np, after.Epoch, after.ActingSet)
	if n == 0 {
		t.Fatal("no durable write was acknowledged before the cut")
	}
	c.waitExport(c.nbd[np], "db")
	for i := 0; i < len(reads); i += 64 {
		j := min(i+64, len(reads))
		if out, err := c.qemuIO(c.nbd[np], "db", reads[i:j]...); err != nil {
			t.Fatalf("an acknowledged durable write is missing on the new primary %s: %v\n%s", np, err, out)
		}
	}
}
