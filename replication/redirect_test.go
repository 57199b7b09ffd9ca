package replication

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
)

// Large writes that the primary's engine writes once, outside its WAL
// (blockvol redirect.go), reach the replica as ordinary writes, live and
// when the replica catches up after being away: the primary's log only
// names where the data went, and catch-up reads it back from there (or,
// when a later write overwrote it in place, falls back to a rebuild).
func TestLargeWritesReplicatedAndCaughtUp(t *testing.T) {
	logs, log := newCapture()
	pn, rn := newNode(t, testVolSize), newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 1, "")
	p := newTestPrimary(t, pn.vol, 1, SyncAll, []Peer{{"srv-r", rs.addr}}, nil, func(c *PrimaryConfig) { c.Logger = log })
	waitState(t, p, "srv-r", InSync)

	var halt atomic.Bool
	var wg sync.WaitGroup
	var large atomic.Int64
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 11))
			for i := 0; !halt.Load(); i++ {
				var err error
				if g == 0 {
					// 1 MiB aligned writes over the first 8 MiB.
					off := rng.Int64N(8) << 20
					buf := make([]byte, 1<<20)
					for k := int64(0); k < 256; k++ {
						copy(buf[k*4096:], pattern(off/4096+k, i*8+g))
					}
					err = p.WriteAt(buf, off, false)
					large.Add(1)
				} else {
					// Small writes, mostly above the large ones, now and
					// then into their chunks.
					half := int64(testVolSize / 4096 / 2)
					lba := half + rng.Int64N(half)
					if g == 2 && i%8 == 0 {
						lba = rng.Int64N(half)
					}
					err = p.WriteAt(pattern(lba, i*8+g), lba*4096, false)
				}
				if err != nil {
					t.Errorf("writer %d: %v", g, err)
					return
				}
				if i%16 == 15 {
					p.Flush() // may fail while the replica is away (sync_all)
				}
			}
		}(g)
	}
	waitFor(t, "large writes", func() bool { return large.Load() > 20 })
	rs.stop()
	waitFor(t, "replica degraded", func() bool { st, _ := replicaState(p, "srv-r"); return st.State != InSync })
	n0 := large.Load()
	rn.reopen()
	waitFor(t, "large writes while the replica is away", func() bool { return large.Load() > n0+30 })
	rs.set("v1", rn.vol, 1, "")
	rs.restart()
	waitState(t, p, "srv-r", InSync)
	halt.Store(true)
	wg.Wait()
	if err := p.Flush(); err != nil {
		t.Fatalf("flush after catch-up: %v", err)
	}
	st := pn.vol.Stats()
	if st.RedirectWrites == 0 {
		t.Fatal("no large write took the redirect path: the test tests nothing")
	}
	t.Logf("%d large writes, %d redirected on the primary (%d MiB), %d settles", large.Load(), st.RedirectWrites, st.RedirectBytes>>20, st.RedirectSettles)
	sameData(t, pn.vol, rn.vol)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-r"})
	// The replica's own engine never holds redirects of its primary.
	if rs := rn.vol.Stats(); rs.RedirectWrites != 0 {
		t.Fatalf("replica redirected %d writes", rs.RedirectWrites)
	}
	// After a restart the primary reads the same.
	pn.reopen()
	sameData(t, pn.vol, rn.vol)
}
