package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// expandLine is the one-line JSON of `blockd volume expand -o json`.
type expandLine struct {
	Name      string   `json:"name"`
	Outcome   string   `json:"outcome"`
	FromBytes int64    `json:"from_bytes"`
	SizeBytes int64    `json:"size_bytes"`
	Members   []string `json:"members"`
	Server    string   `json:"server"`
	Reason    string   `json:"reason"`
}

func parseExpandLine(t *testing.T, out string) expandLine {
	t.Helper()
	if n := strings.Count(strings.TrimSpace(out), "\n"); n != 0 {
		t.Fatalf("volume expand -o json printed %d lines: %q", n+1, out)
	}
	var l expandLine
	if err := json.Unmarshal([]byte(out), &l); err != nil {
		t.Fatalf("volume expand -o json: %v: %q", err, out)
	}
	return l
}

// waitSizes waits until every member of vol (the primary's and each
// replica's own heartbeat) reports size bytes and nothing pending.
func (c *cluster) waitSizes(vol string, size int64, members int) {
	c.t.Helper()
	c.waitFor(fmt.Sprintf("%d members of %s at %d bytes", members, vol, size), 30*time.Second, func() error {
		info := c.info(vol)
		if len(info.MemberSizes) != members {
			return fmt.Errorf("member sizes %+v", info.MemberSizes)
		}
		for _, ms := range info.MemberSizes {
			if ms.SizeBytes != size || ms.PendingSizeBytes != 0 {
				return fmt.Errorf("member sizes %+v", info.MemberSizes)
			}
		}
		return nil
	})
}

// Two-phase expand on three servers (RF=3 sync_all): every replica
// prepares, then all commit; a replica killed before it prepared cancels
// the expand, every replica keeps the old size; once it is back a later
// expand succeeds.
func TestExpandTwoPhase(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	for _, id := range []string{"s1", "s2", "s3"} {
		c.startServer(id)
	}
	if out, err := c.cli("volume", "create", "ex", "--size", "64MiB", "--rf", "3", "--durability", "sync_all"); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	info := c.waitHealthy("ex", 60*time.Second)
	prim := info.Primary.ServerID
	if out, err := c.qemuIO(c.nbd[prim], "ex", "write -P 0x5a 63M 1M", "flush"); err != nil {
		t.Fatalf("write: %v\n%s", err, out)
	}

	// 1. Every member prepares, then all commit.
	out, err := c.cli("volume", "expand", "ex", "--size", "128MiB", "-o", "json")
	if err != nil {
		t.Fatalf("expand: %v\n%s", err, out)
	}
	l := parseExpandLine(t, out)
	if l.Outcome != api.ExpandCommitted || l.FromBytes != 64<<20 || l.SizeBytes != 128<<20 || len(l.Members) != 3 {
		t.Fatalf("expand outcome %+v", l)
	}
	c.waitSizes("ex", 128<<20, 3)
	// The primary's frontend serves the new size; old data is intact and
	// the new range is writable.
	c.waitFor("the export at 128 MiB", 30*time.Second, func() error {
		out, err := c.qemuIO(c.nbd[prim], "ex", "read -P 0x5a 63M 1M", "write -P 0x6b 127M 1M", "read -P 0x6b 127M 1M", "flush")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	c.waitHealthy("ex", 30*time.Second)

	// The text output is one line.
	out, err = c.cli("volume", "expand", "ex", "--size", "128MiB")
	if err != nil || strings.Count(strings.TrimSpace(out), "\n") != 0 || !strings.Contains(out, "already") {
		t.Fatalf("expand to the same size: %v %q", err, out)
	}

	// 2. A replica dies just before the expand: it never prepares; the
	// master cancels, naming it, and every member keeps 128 MiB.
	var victim string
	for _, r := range info.Replicas {
		victim = r.ServerID
	}
	c.servers[victim].kill9()
	out, err = c.cli("volume", "expand", "ex", "--size", "256MiB", "-o", "json")
	if err == nil {
		t.Fatalf("expand with a dead replica succeeded: %s", out)
	}
	if !strings.Contains(err.Error(), "cancelled") || !strings.Contains(err.Error(), "server "+victim) {
		t.Fatalf("the cancel does not name %s: %v", victim, err)
	}
	l = parseExpandLine(t, out)
	if l.Outcome != api.ExpandCancelled || l.Server != victim || l.SizeBytes != 128<<20 {
		t.Fatalf("cancel outcome %+v", l)
	}
	t.Logf("cancelled: %s", l.Reason)
	info = c.info("ex")
	if info.SizeBytes != 128<<20 {
		t.Fatalf("size %d after the cancel", info.SizeBytes)
	}
	c.waitFor("survivors drop the prepared size", 30*time.Second, func() error {
		for _, ms := range c.info("ex").MemberSizes {
			if ms.ServerID != victim && (ms.SizeBytes != 128<<20 || ms.PendingSizeBytes != 0) {
				return fmt.Errorf("member sizes %+v", c.info("ex").MemberSizes)
			}
		}
		return nil
	})

	// 3. Back: it reports the old size too, and a later expand succeeds on
	// every member.
	c.startServer(victim)
	c.waitHealthy("ex", 90*time.Second)
	c.waitSizes("ex", 128<<20, 3)
	out, err = c.cli("volume", "expand", "ex", "--size", "256MiB", "-o", "json")
	if err != nil {
		t.Fatalf("expand after the replica is back: %v\n%s", err, out)
	}
	if l = parseExpandLine(t, out); l.Outcome != api.ExpandCommitted || l.SizeBytes != 256<<20 || len(l.Members) != 3 {
		t.Fatalf("expand outcome %+v", l)
	}
	c.waitSizes("ex", 256<<20, 3)
	c.waitFor("the export at 256 MiB", 30*time.Second, func() error {
		out, err := c.qemuIO(c.nbd[prim], "ex", "read -P 0x5a 63M 1M", "read -P 0x6b 127M 1M", "write -P 0x7c 255M 1M", "flush")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
}

// The master is killed (-9) while an expand prepares (one replica is
// stopped, so the expand cannot end before the kill). The intent is raft
// state: the restarted master finishes it from the members' heartbeats,
// and every member ends at one size; a retry of the same expand then
// reports it done.
func TestExpandMasterCrashWhilePreparing(t *testing.T) {
	c := newCluster(t)
	m := c.startMaster()
	for _, id := range []string{"s1", "s2", "s3"} {
		c.startServer(id)
	}
	if out, err := c.cli("volume", "create", "mc", "--size", "64MiB", "--rf", "3", "--durability", "sync_all"); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	info := c.waitHealthy("mc", 60*time.Second)
	stopped := info.Replicas[0].ServerID
	c.servers[stopped].signal(syscall.SIGSTOP)
	done := make(chan error, 1)
	go func() {
		_, err := c.cli("volume", "expand", "mc", "--size", "128MiB", "--wait", "0s")
		done <- err
	}()
	c.waitFor("the expand preparing", 10*time.Second, func() error {
		if e := c.info("mc").Expand; e == nil || e.Phase != api.ExpandPreparing {
			return fmt.Errorf("expand %+v", e)
		}
		return nil
	})
	m.kill9()
	c.servers[stopped].signal(syscall.SIGCONT)
	t.Logf("the interrupted expand call: %v", <-done)
	m.start(t)
	c.waitFor("master leader again", 30*time.Second, func() error {
		st, err := c.client.Status(context.Background(), c.mAPI[0])
		if err != nil {
			return err
		}
		if !st.IsLeader {
			return fmt.Errorf("state %s", st.State)
		}
		return nil
	})
	var e *api.ExpandStatus
	c.waitFor("the expand decided by the new leader", 30*time.Second, func() error {
		if e = c.info("mc").Expand; e == nil || e.Phase == api.ExpandPreparing {
			return fmt.Errorf("expand %+v", e)
		}
		return nil
	})
	t.Logf("after the master restart: %s %s", e.Phase, e.Reason)
	want := int64(64 << 20)
	if e.Phase == api.ExpandCommitted {
		want = 128 << 20
	}
	c.waitSizes("mc", want, 3)
	out, err := c.cli("volume", "expand", "mc", "--size", "128MiB", "-o", "json")
	if err != nil {
		t.Fatalf("expand after the master restart: %v\n%s", err, out)
	}
	c.waitSizes("mc", 128<<20, 3)
}

// A replica that prepared crashes (-9) before the master decides; after
// its restart its pending size is resolved by the master's word: dropped
// when the expand was cancelled (here because another replica was stopped
// too long), committed when it was committed (the other replica resumed
// in time). Every member ends at one size each time.
func TestExpandPreparedReplicaCrash(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	for _, id := range []string{"s1", "s2", "s3"} {
		c.startServer(id)
	}
	if out, err := c.cli("volume", "create", "pc", "--size", "64MiB", "--rf", "3", "--durability", "sync_all"); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	info := c.waitHealthy("pc", 60*time.Second)
	crash, hold := info.Replicas[0].ServerID, info.Replicas[1].ServerID

	// run holds one replica, expands, waits until the other replica
	// reported prepared and kills it; release says when to let the held
	// one go on. It returns the expand call's error.
	run := func(size string, release func()) error {
		c.servers[hold].signal(syscall.SIGSTOP)
		done := make(chan error, 1)
		go func() {
			_, err := c.cli("volume", "expand", "pc", "--size", size)
			done <- err
		}()
		c.waitFor(crash+" prepared", 10*time.Second, func() error {
			e := c.info("pc").Expand
			if e == nil || e.Phase != api.ExpandPreparing || !slices.Contains(e.Prepared, crash) {
				return fmt.Errorf("expand %+v", e)
			}
			return nil
		})
		c.servers[crash].kill9()
		release()
		return <-done
	}

	// Cancelled: the held replica stays silent past the limit.
	err := run("128MiB", func() {
		c.waitFor("the cancel", 20*time.Second, func() error {
			if e := c.info("pc").Expand; e == nil || e.Phase != api.ExpandCancelled {
				return fmt.Errorf("expand %+v", e)
			}
			return nil
		})
		c.servers[hold].signal(syscall.SIGCONT)
	})
	if err == nil || !strings.Contains(err.Error(), "server "+hold) {
		t.Fatalf("expand with a held replica: %v", err)
	}
	c.startServer(crash)
	c.waitSizes("pc", 64<<20, 3) // the restarted replica dropped its pending size
	c.waitFor(crash+" dropped its prepared size after the restart", 10*time.Second, func() error {
		return c.logHas(crash, "msg=expand_cancelled_local")
	})
	c.waitHealthy("pc", 90*time.Second)

	// Committed: the held replica resumes at once and prepares; the
	// crashed one had prepared before it died.
	if err := run("128MiB", func() { c.servers[hold].signal(syscall.SIGCONT) }); err != nil {
		t.Fatalf("expand with a prepared replica crashed: %v", err)
	}
	if info := c.info("pc"); info.SizeBytes != 128<<20 {
		t.Fatalf("size %d", info.SizeBytes)
	}
	c.startServer(crash)
	c.waitSizes("pc", 128<<20, 3) // the restarted replica committed its pending size
	if err := c.logHas(crash, "prepared=true"); err != nil {
		t.Fatal(err)
	}
	c.waitHealthy("pc", 90*time.Second)
}

// logHas checks the current life (since its last start) of a server's log
// for a substring.
func (c *cluster) logHas(id, sub string) error {
	b, err := os.ReadFile(filepath.Join(c.dir, id+".log"))
	if err != nil {
		return err
	}
	life := string(b)
	if i := strings.LastIndex(life, "==== start"); i >= 0 {
		life = life[i:]
	}
	if !strings.Contains(life, sub) {
		return fmt.Errorf("%s.log (this life) lacks %q", id, sub)
	}
	return nil
}
