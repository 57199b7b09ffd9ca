package torture

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestDeposedPrimaryServesNoStaleRead is the regression test of the first
// violation the long torture found (TORTURE_SEED=566978, failover 4): the
// primary is cut off from the master while a client stays connected to it.
// Once its lease runs out it refuses writes and flushes (EPERM), but it
// went on answering reads; after the master promoted another server and
// that one accepted a write, the old primary still returned the old block:
// a stale read, not linearizable (193 of 193 reads stale before the fix;
// the fix gates reads on the lease like writes, in replication).
//
// The test reads through the old primary until well after the new primary
// acknowledged a write, and fails if any read invoked after that
// acknowledgement returned the old value.
func TestDeposedPrimaryServesNoStaleRead(t *testing.T) {
	c := newCluster(t)
	c.startMaster(2 * time.Second)
	for _, id := range []string{"s1", "s2", "s3"} {
		c.addServer(id, true)
		c.server(id).start(t)
	}
	const vol = "st"
	c.waitFor("servers", 60*time.Second, func() error {
		_, err := c.cli("volume", "create", vol, "--size", "16MiB", "--rf", "3", "--durability", "sync_all")
		return err
	})
	c.waitFor(vol+" healthy", 60*time.Second, func() error { return c.healthy(vol) })
	info, err := c.info(vol)
	if err != nil {
		t.Fatal(err)
	}
	old := info.Primary.ServerID
	a, err := Dial(info.Primary.NBDAddr, vol, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	buf := make([]byte, BlockSize)
	Pattern(buf, 1, 0)
	if err := a.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(); err != nil {
		t.Fatal(err)
	}

	type read struct {
		call, ret time.Time
		tag       uint64
		err       error
	}
	var mu sync.Mutex
	var reads []read
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		rb := make([]byte, BlockSize)
		for {
			select {
			case <-stop:
				return
			default:
			}
			call := time.Now()
			err := a.ReadAt(rb, 0)
			r := read{call: call, ret: time.Now(), err: err}
			if err == nil {
				r.tag = Decode(rb, 0)
			}
			mu.Lock()
			reads = append(reads, r)
			mu.Unlock()
			if err != nil && !IsServerError(err) {
				return // the connection is gone: nothing stale can follow
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()

	c.mproxy[old].setCut(true)
	defer c.mproxy[old].setCut(false)
	newPrimary, err := waitPromoted(c, vol, old, info.Epoch, 60*time.Second)
	if err != nil {
		t.Fatalf("no failover after isolating %s: %v", old, err)
	}
	// The first write the new primary acknowledges.
	Pattern(buf, 2, 0)
	var acked time.Time
	c.waitFor("a write on the new primary "+newPrimary, 30*time.Second, func() error {
		info, err := c.info(vol)
		if err != nil {
			return err
		}
		b, err := Dial(info.Primary.NBDAddr, vol, 5*time.Second)
		if err != nil {
			return err
		}
		defer b.Close()
		if err := b.WriteAt(buf, 0); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		acked = time.Now()
		return nil
	})
	time.Sleep(2 * time.Second)
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	stale, after := 0, 0
	for _, r := range reads {
		if r.call.Before(acked) {
			continue
		}
		after++
		if r.err == nil && r.tag == 1 {
			stale++
		}
	}
	t.Logf("reads through the old primary %s: %d in all, %d invoked after %s acknowledged the new write, %d of them stale",
		old, len(reads), after, newPrimary, stale)
	if stale > 0 {
		t.Fatalf("the deposed primary %s served %d stale reads after the new primary %s acknowledged a write", old, stale, newPrimary)
	}
}
