package master

import (
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// The leader drives a two-phase expand end to end with heartbeating
// servers: commit when all prepared; cancel, naming the member, when one
// reports a prepare failure or goes silent; a later expand succeeds.
func TestExpandTwoPhaseWithServers(t *testing.T) {
	var logs logSink
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", Logger: logs.logger(), LeaseTTL: 2 * time.Second})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	var fs []*fakeServer
	for i, id := range []string{"s1", "s2", "s3"} {
		f := newFakeServer(id, i+1, c.Addrs())
		f.run(50 * time.Millisecond)
		t.Cleanup(f.stop)
		fs = append(fs, f)
	}
	ctx := ctxT(t)
	waitFor(t, "three servers registered", 5*time.Second, func() bool {
		ss, _ := c.Servers(ctx)
		return len(ss) == 3
	})
	if _, err := c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 30, RF: 3, Durability: api.DurabilitySyncAll}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "every member hosts v", 5*time.Second, func() bool {
		for _, f := range fs {
			if v, ok := f.vol("v"); !ok || v.SizeBytes != 1<<30 {
				return false
			}
		}
		return true
	})

	// All prepare: committed, every member at the new size.
	info, err := c.ExpandVolume(ctx, "v", 2<<30)
	if err != nil {
		t.Fatalf("expand: %v", err)
	}
	if info.SizeBytes != 2<<30 || info.Expand == nil || info.Expand.Phase != api.ExpandCommitted || len(info.Expand.Members) != 3 {
		t.Fatalf("after expand: %+v %+v", info, info.Expand)
	}
	if len(logs.find("expand_prepared", "volume", "v")) != 3 || len(logs.find("expand_committed", "volume", "v")) != 1 {
		t.Fatalf("events: prepared %v committed %v", logs.find("expand_prepared"), logs.find("expand_committed"))
	}
	waitFor(t, "members commit", 5*time.Second, func() bool {
		for _, f := range fs {
			if v, _ := f.vol("v"); v.SizeBytes != 2<<30 || v.PendingSizeBytes != 0 {
				return false
			}
		}
		return true
	})
	// The same size again: done at once.
	if _, err := c.ExpandVolume(ctx, "v", 2<<30); err != nil {
		t.Fatalf("expand to the current size: %v", err)
	}

	// One member cannot prepare: cancelled, naming it and its reason.
	fs[2].mu.Lock()
	fs[2].expandErr = "grow extent: no space left on device"
	fs[2].mu.Unlock()
	_, err = c.ExpandVolume(ctx, "v", 4<<30)
	if !api.IsCode(err, api.CodeExpandCancelled) || !strings.Contains(err.Error(), "server s3") || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("expand with a failing member: %v", err)
	}
	if ev := logs.find("expand_cancelled", "volume", "v", "server", "s3", "cause", ExpandCausePrepareFailed); len(ev) != 1 {
		t.Fatalf("expand_cancelled events: %v", logs.find("expand_cancelled"))
	}
	waitFor(t, "members drop the prepared size", 5*time.Second, func() bool {
		for _, f := range fs {
			if v, _ := f.vol("v"); v.SizeBytes != 2<<30 || v.PendingSizeBytes != 0 {
				return false
			}
		}
		return true
	})
	if info := volInfo(t, c, "v"); info.SizeBytes != 2<<30 || info.Expand.Phase != api.ExpandCancelled || info.Expand.Server != "s3" {
		t.Fatalf("after the cancel: size %d expand %+v", info.SizeBytes, info.Expand)
	}
	fs[2].mu.Lock()
	fs[2].expandErr = ""
	fs[2].mu.Unlock()

	// A member heartbeats but never prepares (a server that predates
	// two-phase expand): cancelled at the timeout, after the POST answered
	// 202 and the client polled.
	fs[0].mu.Lock()
	fs[0].expandOld = true
	fs[0].mu.Unlock()
	_, err = c.ExpandVolume(ctx, "v", 4<<30)
	if !api.IsCode(err, api.CodeExpandCancelled) || !strings.Contains(err.Error(), "server s1 did not prepare") {
		t.Fatalf("expand with a member that never prepares: %v", err)
	}
	if len(logs.find("expand_cancelled", "volume", "v", "server", "s1", "cause", ExpandCauseTimeout)) != 1 {
		t.Fatalf("expand_cancelled events: %v", logs.find("expand_cancelled"))
	}
	fs[0].mu.Lock()
	fs[0].expandOld = false
	fs[0].mu.Unlock()

	// A member goes silent: cancelled as soon as it counts as silent.
	fs[1].stop()
	_, err = c.ExpandVolume(ctx, "v", 4<<30)
	if !api.IsCode(err, api.CodeExpandCancelled) || !strings.Contains(err.Error(), "server s2 has not heartbeated") {
		t.Fatalf("expand with a silent member: %v", err)
	}
	// Back: a later expand succeeds.
	fs[1].run(50 * time.Millisecond)
	info, err = c.ExpandVolume(ctx, "v", 4<<30)
	if err != nil {
		t.Fatalf("expand after the member is back: %v", err)
	}
	if info.SizeBytes != 4<<30 {
		t.Fatalf("size %d", info.SizeBytes)
	}
	waitFor(t, "member sizes reported", 5*time.Second, func() bool {
		info := volInfo(t, c, "v")
		for _, ms := range info.MemberSizes {
			if ms.SizeBytes != 4<<30 || ms.PendingSizeBytes != 0 {
				return false
			}
		}
		return len(info.MemberSizes) == 3
	})
}
